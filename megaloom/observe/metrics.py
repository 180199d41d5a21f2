"""Run metrics: one JSON object per logged step in `metrics.jsonl`, mirrored to TensorBoard.

Fields of a training row: step, loss, lr, grad_norm, tokens_per_s, mfu (null where the device's peak
is unknown, e.g. CPUs), mem_gib (peak CUDA memory allocated, or the process's peak resident memory on
CPU), tokens (seen so far), elapsed_s, skipped (fp16 overflow steps so far), loss_scale (fp16 only).
Validation rows also carry val_loss.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def memory_report(model: torch.nn.Module, optimizer, device: torch.device) -> dict[str, float | None]:
    """This rank's memory by kind, GiB: parameters, gradients, optimizer state (what this rank holds:
    under ZeRO-1 1/d of the optimizer state, ZeRO-2 also 1/d of the gradients, ZeRO-3 also of the parameters),
    activations (on GPUs: peak allocated minus the rest; unknown on CPUs) and the peak."""
    from megaloom.parallel.data import optimizer_state_bytes, tensor_bytes

    params = sum(tensor_bytes(p) for p in model.parameters())
    grads = sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    opt = optimizer_state_bytes(optimizer) if optimizer is not None else 0  # None: a frozen model
    peak = peak_memory_gib(device)
    static = (params + grads + opt) / 2**30
    return {"params_gib": params / 2**30, "grads_gib": grads / 2**30, "optimizer_gib": opt / 2**30,
            "activations_gib": max(0.0, peak - static) if device.type == "cuda" else None, "peak_gib": peak}


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, row: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, clean["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no inf/nan; null marks "not available"
    return v


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is '{run_dir}' a megaloom run directory?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
