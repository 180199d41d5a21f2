"""One optimizer step over a list of micro-batches: gradient accumulation, loss scaling, clipping."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megaloom.parallel.grads import GradSync, clip_
from megaloom.parallel.pipeline import PipelineRunner, next_token_call
from megaloom.precision import autocast
from megaloom.train.precision import DynamicLossScaler


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss over the micro-batches, still on the device (no host sync)
    grad_norm: torch.Tensor  # global L2 norm before clipping; nan when the step was skipped
    skipped: bool  # non-finite loss or gradients (fp16 overflow among them): the optimizer did not step


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, microbatches: list[tuple[torch.Tensor, ...]],
               *, precision: str = "fp32", scaler: DynamicLossScaler | None = None, grad_clip: float = 0.0,
               sync: GradSync | None = None, pipeline: PipelineRunner | None = None,
               inject: Callable[[list[nn.Parameter]], None] | None = None,
               micro_loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor] | None = None) -> StepResult:
    """Accumulate gradients of the mean loss over equal-sized micro-batches, then step.

    Each micro-batch loss is divided by their number, so k micro-batches of b sequences give the
    gradient of one batch of k·b sequences (the same tokens per micro-batch make the means agree).
    `sync` completes gradients and computes the global norm across a process grid; `pipeline` runs the
    micro-batches through the pipeline schedule instead of one after the other (the returned loss is
    then only known on the last stage, 0 elsewhere). `inject` runs between backward and the update:
    the fault-injection hook of tests and drills. `micro_loss(model, micro)` is the objective's mean loss
    of one micro-batch (megaloom/train/objective.py), next-token prediction unless given; under a
    pipeline the runner's `call` plays that part.

    A step whose global gradient norm is not finite (a non-finite loss makes it so) is skipped on every
    rank: the norm is reduced over the whole grid, so all ranks decide alike. That costs one host sync.
    """
    sync = sync or GradSync(model)
    micro_loss = micro_loss or (lambda m, micro: next_token_call(m, micro[0], micro))
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    sync.zero_grad(optimizer)
    if pipeline is not None:
        total = pipeline.forward_backward(microbatches, precision, scaler.scale if scaler else 1.0) * len(microbatches)
    else:
        total = torch.zeros((), device=device)
        for i, micro in enumerate(microbatches):
            if i == len(microbatches) - 1:
                sync.arm()  # data-parallel reduction overlaps with the last backward
            with autocast(precision, device):
                loss = micro_loss(model, micro)
            total += loss.detach().float()
            scaled = loss / len(microbatches)
            if scaler is not None:
                scaled = scaler.scale_loss(scaled)
            scaled.backward()
    sync.finish()
    if inject is not None:
        inject(params)
    skipped = False
    if scaler is not None:
        skipped = scaler.unscale_(params, sync.any_nonfinite)
        scaler.update(skipped)
    if skipped:
        return StepResult(total / len(microbatches), torch.tensor(math.nan), True)
    grad_norm = sync.norm(params)
    if not torch.isfinite(grad_norm):
        return StepResult(total / len(microbatches), grad_norm, True)
    if grad_clip > 0:
        clip_(params, grad_norm, grad_clip)
    optimizer.step()
    return StepResult(total / len(microbatches), grad_norm, False)
