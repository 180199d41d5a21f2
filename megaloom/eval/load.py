"""MODEL on the command line -> this rank's part of the model in the requested layout, and its tokenizer.

MODEL is a megaloom run directory (its newest checkpoint), a checkpoint directory, a Hugging Face model
directory or a .gguf file; `megaloom.interop` resolves all four and fills the model, as
`build_parallel_model` builds it for training, frozen. Only the layout is chosen here: tp x pp from the
command line, the remaining processes data-parallel over the documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megaloom.config import Config
from megaloom.data import Tokenizer
from megaloom.errors import ConfigError
from megaloom.interop.load import load_parallel_model, resolve
from megaloom.parallel.grid import ProcessGrid
from megaloom.parallel.launch import LaunchEnv, start
from megaloom.train.assemble import ParallelModel
from megaloom.train.checkpoint import read_manifest


@dataclass
class Loaded:
    """A model as this rank holds it, ready to evaluate or sample from."""

    pm: ParallelModel
    tokenizer: Tokenizer
    cfg: Config  # the model's config, in the inference layout
    grid: ProcessGrid
    device: torch.device
    run_dir: Path | None  # where results are appended to metrics.jsonl (MODEL is a run directory)
    step: int | None  # the checkpoint's training step


def layout_overrides(tp: int, pp: int, world_size: int, device: str) -> list[str]:
    """An inference layout as config overrides: tp x pp model-parallel, the other processes data-parallel,
    no ZeRO, one chunk per pipeline rank, no sequence parallelism, one micro-batch per stage (the
    evaluation's own batches replace the training batch)."""
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ConfigError(f"--tp {tp} x --pp {pp} must divide the {world_size} launched processes")
    dp = world_size // (tp * pp)
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", "parallel.zero=0", "parallel.chunks=1",
            "parallel.layers_per_stage=[]", "parallel.sequence_parallel=false", 'parallel.schedule="gpipe"',
            "train.micro_batch=1", f"train.global_batch={pp * dp}", f"train.device={json.dumps(device)}",
            'train.recompute="none"']


def load_for_inference(path: str | Path, env: LaunchEnv, tp: int = 1, pp: int = 1, device: str = "auto") -> Loaded:
    """Start the process group (under torchrun), build the model of MODEL in the layout and fill it.
    Collective: every rank calls it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MODEL '{path}' does not exist; pass a run directory, a checkpoint, "
                                "a Hugging Face model directory or a .gguf file")
    overrides = layout_overrides(tp, pp, env.world_size, device)
    cfg, ckpt = resolve(path, overrides)
    grid, dev = start(cfg, env)
    if ckpt is not None and _is_quantized(ckpt):  # `megaloom quantize` output: torchao weights (docs/compression.md)
        from megaloom.compress.store import load_quantized_parallel

        pm, tokenizer, cfg = load_quantized_parallel(path, grid, dev, overrides)
    else:
        pm, tokenizer, cfg = load_parallel_model(path, grid, dev, overrides)
    run_dir = step = None
    if ckpt is not None:
        step = int(read_manifest(ckpt).get("step", 0))
        if (ckpt.parent.parent / "config.toml").is_file():  # a checkpoint inside a run directory
            run_dir = ckpt.parent.parent
    return Loaded(pm, tokenizer, cfg, grid, dev, run_dir, step)


def _is_quantized(ckpt: Path) -> bool:
    from megaloom.train.checkpoint import saved_keys

    return "quantization" in saved_keys(ckpt)
