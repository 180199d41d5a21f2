"""Gradient finishing and the global gradient norm on a process grid.

The global norm counts every parameter once: tensor-parallel shards contribute their squares summed
over the tp group; parameters every tp rank holds whole (norms, row-parallel biases) count once.
"""

from __future__ import annotations

import torch
from torch import nn

from megaloom.parallel.comm import TPGroup, all_reduce_no_grad
from megaloom.parallel.tensor import sync_replicated_grads


class GradSync:
    def __init__(self, model: nn.Module, tp: TPGroup | None = None):
        self.model, self.tp = model, tp

    def finish(self) -> None:
        """Make every gradient complete before the norm and the step."""
        if self.tp is not None:
            sync_replicated_grads(self.model, self.tp)

    def norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """Global L2 norm of the gradients of the whole (unsharded) model."""
        sharded = [p.grad for p in params if p.grad is not None and getattr(p, "shard_spec", None) is not None]
        whole = [p.grad for p in params if p.grad is not None and getattr(p, "shard_spec", None) is None]
        device = next(iter(params)).device
        sq_sharded = _sum_sq(sharded, device)
        if self.tp is not None:
            all_reduce_no_grad(sq_sharded, self.tp)
        return (sq_sharded + _sum_sq(whole, device)).sqrt()

    def any_nonfinite(self, found: torch.Tensor) -> torch.Tensor:
        """fp16 overflow anywhere in the model skips the step on every rank."""
        if self.tp is not None:
            all_reduce_no_grad(found, self.tp, torch.distributed.ReduceOp.MAX)
        return found


def _sum_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).float().pow(2).sum()


def clip_(params: list[nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients so their global norm is at most max_norm (as torch.nn.utils.clip_grad_norm_)."""
    grads = [p.grad for p in params if p.grad is not None]
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)
