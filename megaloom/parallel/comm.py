"""The communication operators of tensor and sequence parallelism, as autograd functions.

Megatron-LM paper §2.3 (reference/004), Figure 5: `f` is the identity forward and an all-reduce
backward; `g` is an all-reduce forward and the identity backward. A transformer layer needs two `g`
forward and two `f` backward. Sequence parallelism (Korthikanti et al. 2022, §4.2.2) replaces each
all-reduce by a reduce-scatter plus an all-gather along the sequence: `g` becomes a reduce-scatter
(forward) / all-gather (backward), `f` an all-gather (forward) / reduce-scatter (backward).

Tensors are (batch, sequence, hidden); the sequence is dim 1. Every collective is counted in the
group's `CommCounter` as the bytes one rank sends under the ring algorithm (all-reduce 2(t-1)/t·n,
all-gather and reduce-scatter (t-1)/t·n of the full tensor's n bytes), the accounting of the paper's
8·b·s·h·(t-1)/t per layer.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor that FSDP (ZeRO-2/3) turned into a DTensor; the tensor otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class CommCounter:
    """Bytes this rank sent, per operation; the trainer reads and resets it at every log line.

    Collectives count what one rank sends under the ring algorithm (`add`: all-reduce 2(n-1)/n of the
    tensor's bytes, all-gather and reduce-scatter (n-1)/n of the full tensor); point-to-point sends
    count their own bytes (`add_sent`). The ring factor follows the name's ending (`..._all_reduce` is
    an all-reduce, so `embedding_all_reduce` counts as one). While `paused` nothing is counted."""

    sent: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    paused: bool = False

    def add(self, op: str, full_bytes: int, size: int) -> None:
        if size > 1 and not self.paused:
            factor = 2 * (size - 1) / size if op.endswith("all_reduce") else (size - 1) / size
            self.sent[op] += factor * full_bytes

    def add_sent(self, op: str, nbytes: int) -> None:
        if not self.paused:
            self.sent[op] += nbytes

    def take(self) -> dict[str, float]:
        out = dict(self.sent)
        self.sent.clear()
        return out


@dataclass
class TPGroup:
    """A tensor-parallel group as the layers see it: the process group, its size, this rank's index."""

    group: dist.ProcessGroup | None
    size: int
    rank: int
    sequence_parallel: bool = False
    counter: CommCounter = field(default_factory=CommCounter)


def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    x = x.contiguous()
    tp.counter.add("all_reduce", x.numel() * x.element_size(), tp.size)
    dist.all_reduce(x, group=tp.group)
    return x


def _all_gather_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    tp.counter.add("all_gather", x.numel() * x.element_size() * tp.size, tp.size)
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    if x.shape[1] % tp.size:
        raise ValueError(f"sequence parallelism: sequence length {x.shape[1]} is not divisible by parallel.tp ({tp.size})")
    parts = [p.contiguous() for p in x.chunk(tp.size, dim=1)]
    out = torch.empty_like(parts[0])
    tp.counter.add("reduce_scatter", x.numel() * x.element_size(), tp.size)
    dist.reduce_scatter(out, parts, group=tp.group)
    return out


def _identity(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x


def _all_reduce_copy(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _all_reduce(x.clone(), tp)  # never reduce autograd's own tensor in place


class _Conjugate(torch.autograd.Function):
    """A communication operator: `forward(x)` one way, `backward(grad)` its conjugate.

    f = (identity, all-reduce), g = (all-reduce, identity); under sequence parallelism
    f = (all-gather, reduce-scatter) and g = (reduce-scatter, all-gather) along the sequence.
    """

    @staticmethod
    def forward(ctx, x, tp, forward, backward):
        ctx.tp, ctx.backward_fn = tp, backward
        return forward(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.tp), None, None, None


def enter_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Input of a column-parallel region: `f`, or the sequence all-gather under sequence parallelism."""
    if tp.size == 1:
        return x
    if tp.sequence_parallel:
        return _Conjugate.apply(x, tp, _all_gather_seq, _reduce_scatter_seq)
    return _Conjugate.apply(x, tp, _identity, _all_reduce_copy)


def leave_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Output of a row-parallel region: `g`, or the sequence reduce-scatter under sequence parallelism."""
    if tp.size == 1:
        return x
    if tp.sequence_parallel:
        return _Conjugate.apply(x, tp, _reduce_scatter_seq, _all_gather_seq)
    return _Conjugate.apply(x, tp, _all_reduce_copy, _identity)


@contextlib.contextmanager
def whole_sequence(tp: TPGroup | None) -> Iterator[None]:
    """Sequence parallelism off inside: every rank holds the whole sequence between the tensor-parallel
    regions (generation in a training run: prompts of any length, then one token at a time). The layers
    read the flag at each call, so a forward without gradients may switch it."""
    if tp is None or not tp.sequence_parallel:
        yield
        return
    tp.sequence_parallel = False
    try:
        yield
    finally:
        tp.sequence_parallel = True


def sum_over_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The sum of each rank's partial x over the tp group, every rank then holding the whole: `g` without
    sequence parallelism (all-reduce forward, identity backward), for values some ranks hold all of and
    the others none (a reward model's score under sequence parallelism: the rank holding the position)."""
    if tp.size == 1:
        return x
    return _Conjugate.apply(x, tp, _all_reduce_copy, _identity)


def counted_all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, counter: CommCounter,
                       name: str = "all_reduce", op: dist.ReduceOp = dist.ReduceOp.SUM,
                       size: int | None = None) -> torch.Tensor:
    """`dist.all_reduce(x)` in place over `group` (None: every rank), its bytes counted in `counter` as
    `name` (a ring all-reduce over `size` ranks, the group's size by default)."""
    counter.add(name, x.numel() * x.element_size(), size or dist.get_world_size(group))
    dist.all_reduce(x, op=op, group=group)
    return x


def all_reduce_no_grad(x: torch.Tensor, tp: TPGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """An all-reduce outside autograd (loss statistics, gradient sync), counted like the others."""
    if tp.size == 1:
        return x
    return counted_all_reduce(x, tp.group, tp.counter, op=op, size=tp.size)
