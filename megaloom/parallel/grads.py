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

# FSDP2's default collectives (torch 2.13, pinned), subclassed only to count their bytes
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

from megaloom.parallel.comm import CommCounter, TPGroup, all_reduce_no_grad, counted_all_reduce, local
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
        # bytes sent outside the tp group and the gradient buffer: the tied-embedding sum and the norm
        # over pp ("pp"), the norm's and the overflow flag's reductions over dp-sharded gradients ("dp")
        self.counters = {"pp": CommCounter(), "dp": CommCounter()}

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        if self.dp_buffer is not None:
            self.dp_buffer.zero()  # gradients are views into the buffer: zero it, never drop them
        else:
            optimizer.zero_grad(set_to_none=True)
        if self.fsdp is not None:
            self.fsdp.gradient_sync(False)  # accumulate unreduced until the last micro-batch

    def arm(self, chunk: int | None = None) -> None:
        """The coming backward is the batch's last (of pipeline chunk `chunk`; of the whole model by
        default): its data-parallel buckets reduce as they complete, FSDP reduce-scatters."""
        if self.dp_buffer is not None:
            self.dp_buffer.arm(chunk)
        if self.fsdp is not None:
            self.fsdp.gradient_sync(True, chunk)

    def chunk_done(self, chunk: int) -> None:
        """Pipeline chunk `chunk` ran its last backward (B, or zero-bubble's W) of the step: whatever of
        its data-parallel reduction no hook started starts now."""
        if self.dp_buffer is not None:
            self.dp_buffer.launch(chunk)

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
                if not p.requires_grad:  # frozen on both stages (parameter-efficient fine-tuning): nothing to sum
                    continue
                counted_all_reduce(local(p.grad), self.embed_group, self.counters["pp"], "embedding_all_reduce")

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
            group = self.fsdp.dp_group if self.fsdp is not None else self.dp_buffer.dp.group
            counted_all_reduce(both, group, self.counters["dp"], "norm_all_reduce")
            sq_sharded, sq_whole = both[0], both[1]
        if self.tp is not None:
            all_reduce_no_grad(sq_sharded, self.tp)
        total = sq_sharded + sq_whole
        if self.pp_group is not None:
            counted_all_reduce(total, self.pp_group, self.counters["pp"], "norm_all_reduce")
        return total.sqrt()

    def any_nonfinite(self, found: torch.Tensor) -> torch.Tensor:
        """fp16 overflow anywhere in the model skips the step on every rank. Where the gradients are
        sharded over dp (ZeRO-2/3's FSDP shards, ZeRO-1's reduce-scattered ranges) each rank has checked
        only its own, and ranks that disagreed about skipping would wait in different collectives: the
        flag is then combined over every rank of the grid (the default group, dp x tp x pp), still in
        one reduction; otherwise over the model-parallel group (the dp replicas agree already)."""
        if self.fsdp is not None or self._scattered():
            counted_all_reduce(found, None, self.counters["dp"], "overflow_all_reduce", dist.ReduceOp.MAX)
        elif self.mp_group is not None:
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.mp_group)
        elif self.tp is not None:
            all_reduce_no_grad(found, self.tp, dist.ReduceOp.MAX)
        return found


class FSDPState:
    """ZeRO-2/3 through FSDP2's `fully_shard` on the dp axis: the roots (one per pipeline chunk) to
    toggle gradient sync on, and `counter`, the bytes its all-gathers and reduce-scatters send."""

    def __init__(self, roots: list[nn.Module], dp_group: dist.ProcessGroup):
        self.roots, self.dp_group = roots, dp_group
        self.counter = CommCounter()

    def gradient_sync(self, on: bool, chunk: int | None = None) -> None:
        for root in self.roots if chunk is None else [self.roots[chunk]]:
            root.set_requires_gradient_sync(on)

    def count(self, module: nn.Module) -> None:
        """Count the bytes of `module`'s (a `fully_shard`ed module's) collectives in `counter`, through
        FSDP2's comm hooks (`set_custom_all_gather` / `set_custom_reduce_scatter`)."""
        module.set_custom_all_gather(_CountingAllGather(self.counter))
        module.set_custom_reduce_scatter(_CountingReduceScatter(self.counter))

    def reshard(self) -> None:
        """Put the sharded parameters back in the modules. ZeRO-2 keeps a forward's gathered parameters
        until backward, so after evaluation the modules hold unsharded ones: checkpoints need the shards."""
        from torch.distributed.fsdp import FSDPModule

        for root in self.roots:
            for m in root.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()


class _CountingAllGather(DefaultAllGather):
    """FSDP2's own all-gather, counted: one rank sends (d-1)/d of the gathered bytes."""

    def __init__(self, counter: CommCounter):
        self.counter = counter

    def __call__(self, output_tensor, input_tensor, group, async_op=False):  # noqa: ANN001, ANN204
        self.counter.add("fsdp_all_gather", output_tensor.numel() * output_tensor.element_size(),
                         dist.get_world_size(group))
        return super().__call__(output_tensor, input_tensor, group, async_op)


class _CountingReduceScatter(DefaultReduceScatter):
    """FSDP2's own reduce-scatter, counted: one rank sends (d-1)/d of the gradient bytes it reduces."""

    def __init__(self, counter: CommCounter):
        self.counter = counter

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # noqa: ANN001, ANN204
        self.counter.add("fsdp_reduce_scatter", input_tensor.numel() * input_tensor.element_size(),
                         dist.get_world_size(group))
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def _sum_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).float().pow(2).sum()


def clip_(params: list[nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients so their global norm is at most max_norm (as torch.nn.utils.clip_grad_norm_)."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    if not grads:  # a pipeline stage that trains nothing (prompt tuning's later stages)
        return
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)
