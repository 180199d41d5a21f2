"""The precisions a run computes in, and the autocast context for them: the one piece of mixed precision
that model code, the pipeline runtime and the trainer all need, so it sits below all three. Loss
scaling, which only the training step needs, is in `megaloom.train.precision`."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 matrix multiplies under `torch.autocast`; fp32 runs without a context."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])
