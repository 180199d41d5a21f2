"""Single-process checkpoints: written atomically, newest selected through a `latest` pointer.

Layout of `<run>/checkpoints/step_00000200/`:
  model.safetensors   weights under their canonical (layout-independent) names, fp32
  train_state.rank00000.pt  per rank: optimizer (its shards), loss scaler, RNG states, data-loader
                      position, step
  config.toml         the resolved config of the run
Tensor-parallel shards are gathered into full tensors for model.safetensors, so the weights load into
any layout. The directory is written under a temporary name, fsynced and renamed by rank 0; `latest` is
updated last, so a crash while saving leaves the previous checkpoint intact and selected.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from megaloom.parallel.comm import TPGroup
from megaloom.parallel.grid import ProcessGrid
from megaloom.parallel.tensor import gather_full

CKPT_DIR = "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, train_state: dict[str, Any], config_toml: str,
                    keep: int = 2, tp: TPGroup | None = None, grid: ProcessGrid | None = None) -> Path:
    """Collective when the run has several processes: every rank calls it."""
    rank = grid.rank if grid is not None else 0
    root = run_dir / CKPT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    weights = full_weights(model, tp, grid)  # a collective under tensor and pipeline parallelism
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
    _barrier()
    torch.save(train_state, tmp / f"train_state.rank{rank:05d}.pt")
    _fsync(tmp / f"train_state.rank{rank:05d}.pt")
    _barrier()
    if rank == 0:
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        _write_atomic(root / "latest", final.name + "\n")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def full_weights(model: nn.Module, tp: TPGroup | None = None, grid: ProcessGrid | None = None) -> dict[str, torch.Tensor]:
    """Canonical full fp32 weights on the CPU (complete on rank 0). The tied GPT-2 head is the
    embedding, stored once as `embed.tok.weight`; tensor-parallel shards are gathered into full
    tensors, pipeline stages (model chunks) into one dictionary."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    chunks = list(model) if isinstance(model, nn.ModuleList) else [model]
    out: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            full = gather_full(p, tp)
            out.setdefault(name, full.float().cpu().contiguous().clone())
    if grid is not None and grid.pp > 1:
        parts = [None] * grid.world_size if grid.rank == 0 else None
        mine = out if grid.tp_rank == 0 and grid.dp_rank == 0 else {}
        dist.gather_object(mine, parts, dst=0)
        out = {}
        for part in parts or []:
            for name, value in part.items():
                out.setdefault(name, value)  # the last stage's copy of the tied embedding equals the first's
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the newest one of a run directory."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    pointer = path / CKPT_DIR / "latest"
    if pointer.is_file():
        ckpt = path / CKPT_DIR / pointer.read_text().strip()
        if (ckpt / "model.safetensors").is_file():
            return ckpt
    raise FileNotFoundError(f"'{path}' holds no checkpoint (no model.safetensors, no {CKPT_DIR}/latest); "
                            "pass a run directory that has finished at least one save")


def load_weights(model: nn.Module, ckpt: Path) -> None:
    state = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = getattr(model, "_orig_mod", model).load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_train_state(ckpt: Path, rank: int = 0) -> dict[str, Any]:
    return torch.load(ckpt / f"train_state.rank{rank:05d}.pt", weights_only=False)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
