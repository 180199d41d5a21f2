"""Load a model for inference or training from any of the four things people point at: a run directory,
a megaloom checkpoint, a Hugging Face model directory or a .gguf file.

`load_model` builds the single-process model; `load_parallel_model` builds this rank's part of it in
the config's (t, p, d, ZeRO) layout on a `ProcessGrid` (collective: every rank calls it). Both fill
the model through `model_entries` pieces: from a checkpoint with `checkpoint.load`, from pretrained
weights with `fill.fill`; the trainer does the same through `PretrainedWeights`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megaloom.config import Config, ModelConfig, load_config, read_toml
from megaloom.data.tokenizer import Tokenizer, load_tokenizer, pretrained_tokenizer
from megaloom.interop.fill import fill, pretrained_source
from megaloom.interop.hparams import is_gguf
from megaloom.model import build_model
from megaloom.model.transformer import Transformer
from megaloom.parallel.grid import ProcessGrid
from megaloom.train.assemble import ParallelModel, build_parallel_model
from megaloom.train.checkpoint import check_model_keys, latest_checkpoint, load, load_peft_run
from megaloom.train.sharded_state import Sharded, model_entries

if TYPE_CHECKING:
    from megaloom.tune.peft import PeftHook


def is_pretrained(path: str | Path) -> bool:
    """A .gguf file or a Hugging Face model directory (it has config.json), not a megaloom checkpoint."""
    path = Path(path)
    return is_gguf(path) or (path / "config.json").is_file()


def resolve(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, Path | None]:
    """The config of `path` (overrides `section.key=value` applied, e.g. parallel.tp=2) and its checkpoint
    (None for a Hugging Face directory or a .gguf file, whose weights model.pretrained names)."""
    path = Path(path)
    if is_pretrained(path):
        return load_config(None, [f"model.pretrained={json.dumps(str(path))}", *overrides]), None
    ckpt = latest_checkpoint(path)
    if read_toml(ckpt / "config.toml").get("peft", {}).get("method", "none") != "none":
        # a PEFT run's checkpoint holds the adapters only: the base is still model.pretrained (or the seed's)
        return load_config(ckpt / "config.toml", ['peft.init=""', *overrides]), ckpt
    # the checkpoint holds the weights: where they came from first is not read again (it may be gone)
    return load_config(ckpt / "config.toml", ['model.pretrained=""', *overrides]), ckpt


def tokenizer_of(path: str | Path, ckpt: Path | None) -> Tokenizer:
    """The tokenizer of a pretrained model, or the one saved beside a checkpoint (in it, or in its run)."""
    if ckpt is None:
        return pretrained_tokenizer(path)
    for directory in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer"):
        if directory.is_dir():
            return load_tokenizer(directory)
    raise FileNotFoundError(f"no tokenizer beside checkpoint {ckpt} (looked in {ckpt / 'tokenizer'} and "
                            f"{ckpt.parent.parent / 'tokenizer'})")


class PretrainedWeights:
    """model.pretrained as the starting point of training: the file is opened and checked against the
    model (missing, unexpected tensors, shapes) when this is made, before any model is built; calling it
    fills a fresh model's pieces (`model_entries`), whatever the layout."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.source = pretrained_source(cfg)

    def __call__(self, state: dict[str, Sharded]) -> str:
        fill(state, self.cfg, self.source)
        return f"the pretrained weights of {self.cfg.pretrained}"


def fill_model(model: torch.nn.Module, cfg: Config, ckpt: Path | None,
               group: dist.ProcessGroup | None = None, adapt: PeftHook | None = None) -> None:
    """Fill `model` (a model, a tensor-parallel shard, pipeline chunks, FSDP-sharded) from the checkpoint
    `ckpt`, or from model.pretrained when `ckpt` is None. Collective over `group` for a checkpoint.
    A PEFT run (peft.method, `adapt` the hook `model` was built with): the frozen base from model.pretrained
    (else it keeps its seeded initialisation), the adapters from `ckpt`, then the hook's `loaded` as the trainer
    calls it once the base holds its weights (peft.quantize_base = "nf4": the base in NF4, as trained)."""
    if cfg.peft.method != "none" and ckpt is not None:
        if adapt is None:
            raise ValueError(f"fill_model: {ckpt} is a peft.method = '{cfg.peft.method}' run; pass the PEFT hook the "
                             "model was built with (adapt=_peft_hook(cfg))")
        adapter = lambda p: getattr(p, "adapter", False)  # noqa: E731
        load_peft_run(ckpt, model, adapter, lambda p: not adapter(p), adapt,
                      PretrainedWeights(cfg.model) if cfg.model.pretrained else None, group)
        return
    state = model_entries(model)
    if ckpt is None:
        PretrainedWeights(cfg.model)(state)
        return
    check_model_keys(ckpt, state, group)
    with torch.no_grad():
        load(ckpt, state, group)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               overrides: list[str] | tuple[str, ...] = ()) -> tuple[Transformer, Tokenizer, Config]:
    """The single-process model (in eval mode, fp32), its tokenizer and config, from a run directory
    (its newest checkpoint), a checkpoint directory, a Hugging Face model directory or a .gguf file."""
    cfg, ckpt = resolve(path, overrides)
    adapt = _peft_hook(cfg)
    if adapt is None:
        model = Transformer(cfg.model)
    else:  # the base initialised from the seed (a PEFT run without model.pretrained), then the adapters
        model = build_model(cfg.model, cfg.train.seed)
        adapt(model, None)
    fill_model(model, cfg, ckpt, adapt=adapt)
    return model.to(device).eval(), tokenizer_of(path, ckpt), cfg


def _peft_hook(cfg: Config) -> PeftHook | None:
    """The adapters of a PEFT run's checkpoint need their modules built first (megaloom/tune)."""
    if cfg.peft.method == "none":
        return None
    from megaloom.tune.peft import PeftHook

    return PeftHook(cfg)


def load_parallel_model(path: str | Path, grid: ProcessGrid, device: torch.device,
                        overrides: list[str] | tuple[str, ...] = ()) -> tuple[ParallelModel, Tokenizer, Config]:
    """This rank's part of the model of `path` in the layout of `grid` (frozen, eval mode), its tokenizer
    and config. `overrides` must give the grid's sizes when they are not the config's (parallel.tp=...,
    parallel.pp=..., parallel.dp=...), and the micro-batch and schedule a pipeline runs. Collective."""
    cfg, ckpt = resolve(path, overrides)
    adapt = _peft_hook(cfg)
    pm = build_parallel_model(cfg, grid, device, trainable=False, adapt=adapt)
    group = None
    if dist.is_initialized() and grid.world_size > 1:
        group = dist.new_group(backend="gloo")  # checkpoint metadata over gloo, whatever the training backend
    fill_model(pm.model, cfg, ckpt, group, adapt)
    pm.model.eval()
    return pm, tokenizer_of(path, ckpt), cfg
