"""Data parallelism: contiguous gradient buffers, bucketed reduction overlapped with backward, ZeRO-1.

Megatron-LM paper §2.1 and §3 (reference/004); ZeRO: Rajbhandari et al. 2020. Hand-written (rather
than torch's DistributedDataParallel) because it must compose with our pipeline runtime, which calls
autograd per micro-batch and per model chunk, and synchronise only once per batch.

- Every parameter's `.grad` is a view into one flat fp32 buffer (per model), so the reduction works on
  large contiguous buckets (`bucket_mb`) instead of hundreds of small tensors.
- Without pipelining the trainer arms the buffers before the *last* micro-batch's backward: a bucket
  whose gradients are all complete starts its asynchronous all-reduce at once, overlapping with the
  rest of the backward. Earlier micro-batches only accumulate. Under pipelining a bucket never spans
  two model chunks (`units`; a bucket knows its own), and each chunk is armed just before its own
  last backward of the step, so its reduction overlaps with the rest of the schedule (Megatron's
  overlap with the cool-down);
  whatever a hook did not start (zero-bubble's W pass accumulates without autograd hooks) starts
  right after that chunk's last B or W (`launch`). Buckets holding a `deferred` parameter (the tied
  embedding under ZeRO-1, which must be summed over the first and last stage before it is
  scattered) wait for `finish`.
- `reduce_dtype = bf16` sends the buckets as bfloat16 (half the bytes; see docs for the tolerance).
- ZeRO-1 (`parallel.zero = 1`): every bucket is padded to a multiple of d and each dp rank owns the
  r-th 1/d of every bucket (Megatron-LM's distributed optimizer). The buckets are reduce-scattered
  (no all-reduce: (d-1)/d of the gradient bytes sent instead of 2(d-1)/d), so a rank holds averaged
  gradients only in the ranges it owns; the norm sums the squared norms of the owned ranges over dp
  (`GradSync.norm`), the optimizer keeps AdamW state for, and updates, only those ranges (its
  gradients are views into the buffer: no second gradient buffer), then each bucket's parameters are
  all-gathered. Under PowerSGD the gradients are still all-reduced (low rank) and only the step is sharded.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megaloom.config import TrainConfig
from megaloom.parallel.comm import CommCounter, local

# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor (deprecated aliases kept); gloo and NCCL
# both implement them
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class DPGroup:
    group: dist.ProcessGroup | None
    size: int
    rank: int


@dataclass
class _Bucket:
    start: int
    end: int
    params: list[nn.Parameter]
    unit: int = 0  # the pipeline chunk its parameters belong to
    pending: int = 0
    armed: bool = False
    work: dist.Work | None = None
    wire: torch.Tensor | None = None


class GradBuffer:
    """The flat gradient buffer of one model and its buckets; `counter` counts the bytes this rank sends."""

    def __init__(self, params: list[nn.Parameter], dp: DPGroup, reduce_dtype: torch.dtype, bucket_mb: float = 25.0,
                 powersgd_rank: int = 0, seed: int = 0, units: list[list[nn.Parameter]] | None = None,
                 deferred: list[nn.Parameter] | None = None):
        self.dp, self.reduce_dtype = dp, reduce_dtype
        self.powersgd = PowerSGD(params, dp, powersgd_rank, seed) if powersgd_rank and dp.size > 1 else None
        self.counter = CommCounter()
        self.scatter = False  # ZeRO-1 (see `shard`): reduce-scatter the buckets instead of all-reducing them
        self.owned: list[tuple[int, int]] = []  # ZeRO-1: this rank's range of each bucket
        self._deferred = {id(p) for p in deferred or []}
        # a bucket never spans two units (pipeline chunks); within a unit, reverse order: the last
        # layers' gradients are ready first in backward
        mine = {id(p) for p in params}
        units = [[p for p in u if id(p) in mine] for u in units] if units else [params]
        self._groups: list[tuple[int, list[nn.Parameter]]] = []  # (unit, parameters) of each bucket
        limit = int(bucket_mb * 2**20 / 4)
        for u in reversed(range(len(units))):
            size = limit
            for p in reversed(units[u]):
                if size >= limit:
                    self._groups.append((u, []))
                    size = 0
                self._groups[-1][1].append(p)
                size += p.numel()
        self._lay_out(pad=1)
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)
            p._grad_buffer = weakref.ref(self)  # ShardedAdamW finds the buffer of its parameters

    def _lay_out(self, pad: int) -> None:
        """Place the buckets in one flat buffer, each padded to a multiple of `pad`; point the gradients at it."""
        self.buckets, self._bucket_of, self.offset = [], {}, {}
        offset = 0
        for unit, group in self._groups:
            start = offset
            for p in group:
                self.offset[id(p)] = offset
                offset += p.numel()
            offset = start + -(-(offset - start) // pad) * pad
            bucket = _Bucket(start, offset, group, unit)
            self.buckets.append(bucket)
            self._bucket_of.update((id(p), bucket) for p in group)
        device = self._groups[0][1][0].device
        self.data = torch.zeros(offset, device=device, dtype=torch.float32)
        for _, group in self._groups:
            for p in group:
                o = self.offset[id(p)]
                p.grad = self.data[o:o + p.numel()].view_as(p)

    def shard(self) -> list[tuple[int, int]]:
        """ZeRO-1: pad every bucket to a multiple of d and give rank r the r-th 1/d of each; from now on
        `finish` reduce-scatters (unless PowerSGD compresses an all-reduce), leaving averaged gradients
        only in the owned ranges. Returns those ranges. Call before the first backward."""
        d, r = self.dp.size, self.dp.rank
        if not self.owned:
            self._lay_out(pad=d)
            self.owned = [(b.start + r * (b.end - b.start) // d, b.start + (r + 1) * (b.end - b.start) // d)
                          for b in self.buckets]
            self.scatter = self.powersgd is None and d > 1
        return self.owned

    def owned_grads(self, p: nn.Parameter) -> list[torch.Tensor]:
        """The parts of p's gradient (1-D views) that lie in this rank's ranges: where, after a
        reduce-scatter, this rank holds the averaged gradient."""
        o, n = self.offset[id(p)], p.numel()
        return [self.data[max(o, s):min(o + n, e)] for s, e in self.owned if max(o, s) < min(o + n, e)]

    def zero(self) -> None:
        self.data.zero_()
        for b in self.buckets:
            b.pending, b.work, b.armed = len(b.params), None, False

    def _buckets(self, unit: int | None) -> list[_Bucket]:
        return [b for b in self.buckets if unit is None or b.unit == unit]

    def arm(self, unit: int | None = None) -> None:
        """The next backward is the batch's last (of unit `unit`, a pipeline chunk; of all by default):
        start each bucket's reduction when it is complete."""
        for b in self._buckets(unit):
            b.armed, b.pending = True, len(b.params)

    def launch(self, unit: int | None = None) -> None:
        """Start the reduction of the unit's buckets that no hook started (their gradients are complete)."""
        if self.powersgd is None:
            for b in self._buckets(unit):
                self._launch(b, early=True)

    def _ready(self, p: nn.Parameter) -> None:
        b = self._bucket_of[id(p)]
        if not b.armed or self.powersgd is not None:
            return
        b.pending -= 1
        if b.pending == 0:
            self._launch(b, early=True)

    def _launch(self, b: _Bucket, early: bool = False) -> None:
        if b.work is not None or self.dp.size == 1:
            return
        if early and self.scatter and any(id(p) in self._deferred for p in b.params):
            return  # the tied embedding: summed over its two stages first, in `finish`
        view = self.data[b.start:b.end]
        view.div_(self.dp.size)  # average over replicas
        b.wire = view if self.reduce_dtype == torch.float32 else view.to(self.reduce_dtype)
        full = b.wire.numel() * b.wire.element_size()
        if self.scatter:
            self.counter.add("reduce_scatter", full, self.dp.size)
            n = b.wire.numel() // self.dp.size
            # in place: the output is this rank's chunk of the input (NCCL's in-place form; gloo too)
            out = b.wire[self.dp.rank * n:(self.dp.rank + 1) * n]
            b.work = _reduce_scatter(out, b.wire, group=self.dp.group, async_op=True)
        else:
            self.counter.add("all_reduce", full, self.dp.size)
            b.work = dist.all_reduce(b.wire, group=self.dp.group, async_op=True)

    def finish(self) -> None:
        """Launch what has not started yet, wait for everything, leave averaged fp32 gradients (under
        ZeRO-1's reduce-scatter, in this rank's ranges only)."""
        if self.powersgd is not None:
            self.powersgd.reduce()
            return
        for b in self.buckets:
            self._launch(b)
        for i, b in enumerate(self.buckets):
            if b.work is not None:
                b.work.wait()
                if b.wire is not None and b.wire.dtype != torch.float32:
                    if self.scatter:
                        s, e = self.owned[i]
                        self.data[s:e].copy_(b.wire[s - b.start:e - b.start])
                    else:
                        self.data[b.start:b.end].copy_(b.wire)
                b.work = b.wire = None
            b.armed = False

    def sent_bytes(self) -> float:
        """Bytes one rank sends for one reduction of the whole buffer: ring all-reduce 2(d-1)/d of the
        buffer, reduce-scatter (ZeRO-1) (d-1)/d."""
        if self.powersgd is not None:
            return 2 * (self.dp.size - 1) / self.dp.size * self.powersgd.wire_numel() * 4
        n = self.data.numel() * torch.finfo(self.reduce_dtype).bits // 8
        return (1 if self.scatter else 2) * (self.dp.size - 1) / self.dp.size * n


class PowerSGD:
    """Low-rank gradient compression for the dp all-reduce (Vogels et al. 2019, "PowerSGD", Alg. 1).

    Each weight matrix's gradient M (plus the error left over from the previous step) is approximated
    by P·Qᵀ of rank r: P = M·Q is all-reduced and orthonormalised, Q = Mᵀ·P is all-reduced, and the
    part the approximation missed is fed back next step (error feedback), so nothing is lost for good.
    Q is kept between steps (warm start). An n x m matrix sends r·(n + m) numbers instead of n·m; vectors
    (biases, norm gains) are all-reduced as they are. Every replica draws the same initial Q from `seed`.
    """

    def __init__(self, params: list[nn.Parameter], dp: DPGroup, rank: int, seed: int):
        self.dp, self.rank = dp, rank
        gen = torch.Generator().manual_seed(seed)
        self.matrices = [p for p in params if p.dim() == 2 and min(p.shape) > rank]
        ids = {id(p) for p in self.matrices}
        self.vectors = [p for p in params if id(p) not in ids]
        self.q = [torch.randn(p.shape[1], rank, generator=gen).to(p.device) for p in self.matrices]
        self.error = [torch.zeros_like(p, dtype=torch.float32) for p in self.matrices]

    def wire_numel(self) -> int:
        return sum(self.rank * sum(p.shape) for p in self.matrices) + sum(p.numel() for p in self.vectors)

    def reduce(self) -> None:
        d, group = self.dp.size, self.dp.group
        if self.vectors:
            flat = torch.cat([p.grad.reshape(-1) for p in self.vectors])
            dist.all_reduce(flat, group=group)
            for p, g in zip(self.vectors, flat.div_(d).split([p.numel() for p in self.vectors])):
                p.grad.copy_(g.view_as(p))
        if not self.matrices:
            return
        ms = [p.grad + e for p, e in zip(self.matrices, self.error)]
        ps = [m @ q for m, q in zip(ms, self.q)]
        flat = torch.cat([x.reshape(-1) for x in ps])
        dist.all_reduce(flat, group=group)
        ps = [torch.linalg.qr(x.view_as(p))[0] for x, p in zip(flat.div_(d).split([x.numel() for x in ps]), ps)]
        qs = [m.T @ p for m, p in zip(ms, ps)]
        flat = torch.cat([x.reshape(-1) for x in qs])
        dist.all_reduce(flat, group=group)
        self.q = [x.view_as(q).clone() for x, q in zip(flat.div_(d).split([x.numel() for x in qs]), qs)]
        for p, m, e, pp, q in zip(self.matrices, ms, self.error, ps, self.q):
            approx = pp @ q.T
            e.copy_(m - approx)  # error feedback: what this step's approximation missed
            p.grad.copy_(approx)


class ShardedAdamW:
    """ZeRO-1: AdamW whose state covers only this dp rank's ranges of the flat buffers.

    The parameters become views into one flat buffer laid out as the gradient buffer (`buffer`, or the
    GradBuffer their gradients live in), so the ranges this rank owns are the same in both: the inner
    AdamW steps flat slices whose gradients are views into the reduce-scattered buffer."""

    def __init__(self, params: list[nn.Parameter], cfg: TrainConfig, dp: DPGroup, buffer: GradBuffer | None = None):
        self.dp = dp
        if buffer is None:
            ref = getattr(params[0], "_grad_buffer", None) if params else None
            buffer = ref() if ref is not None else None
        if buffer is None or any(id(p) not in buffer.offset for p in params):
            raise ValueError("ZeRO-1 (ShardedAdamW) needs the GradBuffer of exactly its parameters; build it first")
        self.buffer = buffer
        owned = buffer.shard()
        device = params[0].device
        self.flat = torch.zeros(buffer.data.numel(), device=device, dtype=params[0].dtype)
        self.bounds = [(p, buffer.offset[id(p)]) for p in params]
        for p, offset in self.bounds:
            self.flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + p.numel()].view_as(p)  # the model now reads the flat buffer
        # this rank's pieces of the parameters, merged into runs of equal weight decay (matrices decay)
        pieces = sorted((max(o, s), min(o + p.numel(), e), p.dim() >= 2)
                        for p, o in self.bounds for s, e in owned if max(o, s) < min(o + p.numel(), e))
        runs: list[list] = []
        for s, e, decay in pieces:
            if runs and runs[-1][1] == s and runs[-1][2] == decay:
                runs[-1][1] = e
            else:
                runs.append([s, e, decay])
        groups = []
        for decay, wd in ((True, cfg.weight_decay), (False, 0.0)):
            shards = []
            for s, e, dec in runs:
                if dec == decay:
                    shard = self.flat[s:e]
                    shard.grad = buffer.data[s:e]  # a view: the reduce-scattered gradients themselves
                    shards.append(shard)
            if shards:
                groups.append({"params": shards, "weight_decay": wd})
        self.inner = torch.optim.AdamW(groups or [{"params": [self.flat[:0]]}], lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:  # the GradBuffer owns the gradients
        return None

    def step(self) -> None:
        self.inner.step()
        if self.dp.size > 1:  # every bucket's parameters from the ranks that updated them
            for b, (s, e) in zip(self.buffer.buckets, self.buffer.owned):
                full = self.flat[b.start:b.end]
                self.buffer.counter.add("all_gather", full.numel() * full.element_size(), self.dp.size)
                _all_gather(full, self.flat[s:e].clone(), group=self.dp.group)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.inner.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for `t` (its local shard when FSDP made it a DTensor)."""
    t = local(t)
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state (Adam moments) this rank holds."""
    if isinstance(optimizer, ShardedAdamW):
        return optimizer.state_bytes()
    return sum(tensor_bytes(t) for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor))
