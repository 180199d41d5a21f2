"""Gradient finishing and the global gradient norm on a process grid.

After `finish()` every data-parallel replica holds the same averaged gradients, so the norm needs no
reduction over dp, except where the gradients are sharded over dp (ZeRO-1's reduce-scatter, ZeRO-2/3's
FSDP): each rank then sums the squares of its own shard and those sums are added over dp. The global
norm counts every parameter of the model exactly once: tensor-parallel shards contribute their squares
summed over the tp group; parameters every tp rank holds whole (norms, row-parallel
biases) count once; pipeline stages add their totals over the pp group; the copy of the tied GPT-2
embedding that the last pipeline stage holds is left out (the first stage counts it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaloom.parallel.comm import TPGroup, all_reduce_no_grad, local
from megaloom.parallel.data import GradBuffer
from megaloom.parallel.tensor import sync_replicated_grads


class GradSync:
    def __init__(self, model: nn.Module, tp: TPGroup | None = None, pp_group: dist.ProcessGroup | None = None,
                 embed_group: dist.ProcessGroup | None = None, tied_copy: list[nn.Parameter] | None = None,
                 mp_group: dist.ProcessGroup | None = None, tied: list[nn.Parameter] | None = None,
                 dp_buffer: GradBuffer | None = None, fsdp: FSDPState | None = None):
        self.model, self.tp, self.dp_buffer, self.fsdp = model, tp, dp_buffer, fsdp
        self.pp_group, self.embed_group, self.mp_group = pp_group, embed_group, mp_group
        self.tied = tied or []  # this rank's tied-embedding parameters (first and last stage)
        self.tied_copy = {id(p) for p in tied_copy or []}  # the last stage's copy: left out of the norm

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        if self.dp_buffer is not None:
            self.dp_buffer.zero()  # gradients are views into the buffer: zero it, never drop them
        else:
            optimizer.zero_grad(set_to_none=True)
        if self.fsdp is not None:
            self.fsdp.gradient_sync(self.fsdp.always_sync)  # accumulate unreduced until the last micro-batch

    def arm(self) -> None:
        """The coming backward is the batch's last: data-parallel buckets may reduce as they complete."""
        if self.dp_buffer is not None:
            self.dp_buffer.arm()
        if self.fsdp is not None:
            self.fsdp.gradient_sync(True)

    def finish(self) -> None:
        """Make every gradient complete before the norm and the step: the data-parallel average, the
        sequence-parallel sums, the tied-embedding sum."""
        scattered = self._scattered()
        if scattered:  # the two stages own different ranges after the reduce-scatter: sum the tied copies first
            self._sum_tied()  # (pipelined, so no bucket has started yet; the sums commute)
        if self.dp_buffer is not None:
            self.dp_buffer.finish()
        if self.tp is not None:
            sync_replicated_grads(self.model, self.tp)
        if not scattered:
            self._sum_tied()

    def _sum_tied(self) -> None:
        if self.embed_group is not None:
            # Megatron-LM's embedding group: the first and last stage hold the tied word embedding;
            # summing their gradients keeps the two copies identical after every step.
            for p in self.tied:
                dist.all_reduce(local(p.grad), group=self.embed_group)

    def _scattered(self) -> bool:
        """ZeRO-1 reduce-scatters: a rank holds averaged gradients only in the ranges it owns."""
        return self.dp_buffer is not None and self.dp_buffer.scatter

    def shard_grads(self, p: nn.Parameter) -> list[torch.Tensor]:
        """The gradient this rank is responsible for: its ZeRO-1 ranges of p, its FSDP shard, or all of it."""
        if self._scattered():
            return self.dp_buffer.owned_grads(p)
        return [local(p.grad)]

    def norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """Global L2 norm of the gradients of the whole (unsharded, unpipelined) model."""
        params = [p for p in params if p.grad is not None and id(p) not in self.tied_copy]
        sharded = [g for p in params if getattr(p, "shard_spec", None) is not None for g in self.shard_grads(p)]
        whole = [g for p in params if getattr(p, "shard_spec", None) is None for g in self.shard_grads(p)]
        device = next(self.model.parameters()).device
        sq_sharded, sq_whole = _sum_sq(sharded, device), _sum_sq(whole, device)
        if self.fsdp is not None or self._scattered():  # ZeRO-1/2/3: every gradient is split over the dp ranks
            both = torch.stack([sq_sharded, sq_whole])
            dist.all_reduce(both, group=self.fsdp.dp_group if self.fsdp is not None else self.dp_buffer.dp.group)
            sq_sharded, sq_whole = both[0], both[1]
        if self.tp is not None:
            all_reduce_no_grad(sq_sharded, self.tp)
        total = sq_sharded + sq_whole
        if self.pp_group is not None:
            dist.all_reduce(total, group=self.pp_group)
        return total.sqrt()

    def any_nonfinite(self, found: torch.Tensor) -> torch.Tensor:
        """fp16 overflow anywhere in the model skips the step on every rank. Where the gradients are
        sharded over dp (ZeRO-2/3's FSDP shards, ZeRO-1's reduce-scattered ranges) each rank has checked
        only its own, and ranks that disagreed about skipping would wait in different collectives: the
        flag is then combined over every rank of the grid (the default group, dp x tp x pp), still in
        one reduction; otherwise over the model-parallel group (the dp replicas agree already)."""
        if self.fsdp is not None or self._scattered():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        elif self.mp_group is not None:
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.mp_group)
        elif self.tp is not None:
            all_reduce_no_grad(found, self.tp, dist.ReduceOp.MAX)
        return found


class FSDPState:
    """ZeRO-2/3 through FSDP2's `fully_shard` on the dp axis: the roots to toggle gradient sync on."""

    def __init__(self, roots: list[nn.Module], dp_group: dist.ProcessGroup, always_sync: bool):
        self.roots, self.dp_group, self.always_sync = roots, dp_group, always_sync

    def gradient_sync(self, on: bool) -> None:
        for root in self.roots:
            root.set_requires_gradient_sync(on)

    def reshard(self) -> None:
        """Put the sharded parameters back in the modules. ZeRO-2 keeps a forward's gathered parameters
        until backward, so after evaluation the modules hold unsharded ones: checkpoints need the shards."""
        from torch.distributed.fsdp import FSDPModule

        for root in self.roots:
            for m in root.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()


def _sum_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).float().pow(2).sum()


def clip_(params: list[nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients so their global norm is at most max_norm (as torch.nn.utils.clip_grad_norm_)."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)
