"""Data parallelism: contiguous gradient buffers, bucketed reduction overlapped with backward, ZeRO-1.

Megatron-LM paper §2.1 and §3 (reference/004); ZeRO: Rajbhandari et al. 2020. Hand-written (rather
than torch's DistributedDataParallel) because it must compose with our pipeline runtime, which calls
autograd per micro-batch and per model chunk, and synchronise only once per batch.

- Every parameter's `.grad` is a view into one flat fp32 buffer (per model), so the reduction works on
  large contiguous buckets (`bucket_mb`) instead of hundreds of small tensors.
- Without pipelining the trainer arms the buffers before the *last* micro-batch's backward: a bucket
  whose gradients are all complete starts its asynchronous all-reduce at once, overlapping with the
  rest of the backward. Earlier micro-batches only accumulate. Under pipelining the buckets are
  reduced after the schedule has run (the chunks' last backwards interleave with other work).
- `reduce_dtype = bf16` sends the buckets as bfloat16 (half the bytes; see docs for the tolerance).
- ZeRO-1 (`parallel.zero = 1`): parameters are views into one flat buffer too; each dp rank keeps
  AdamW state for, and updates, only its 1/d contiguous slice, then the slices are all-gathered. The
  gradients are all-reduced (not reduce-scattered) so the global norm and clipping stay exact with no
  extra bookkeeping; a reduce-scatter would halve that traffic (noted in docs/parallelism.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megaloom.config import TrainConfig
from megaloom.parallel.comm import local


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
    pending: int = 0
    work: dist.Work | None = None
    wire: torch.Tensor | None = None


class GradBuffer:
    """The flat gradient buffer of one model and its buckets."""

    def __init__(self, params: list[nn.Parameter], dp: DPGroup, reduce_dtype: torch.dtype, bucket_mb: float = 25.0,
                 powersgd_rank: int = 0, seed: int = 0):
        self.dp, self.reduce_dtype = dp, reduce_dtype
        self.powersgd = PowerSGD(params, dp, powersgd_rank, seed) if powersgd_rank and dp.size > 1 else None
        total = sum(p.numel() for p in params)
        device = params[0].device
        self.data = torch.zeros(total, device=device, dtype=torch.float32)
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        offset, limit = 0, int(bucket_mb * 2**20 / 4)
        current: _Bucket | None = None
        # reverse order: the last layers' gradients are ready first in backward
        for p in reversed(params):
            n = p.numel()
            p.grad = self.data[offset:offset + n].view_as(p)
            if current is None or current.end - current.start >= limit:
                current = _Bucket(offset, offset, [])
                self.buckets.append(current)
            current.params.append(p)
            current.end = offset + n
            self._bucket_of[id(p)] = current
            offset += n
            p.register_post_accumulate_grad_hook(self._ready)
        self.armed = False

    def zero(self) -> None:
        self.data.zero_()
        for b in self.buckets:
            b.pending, b.work = len(b.params), None

    def arm(self) -> None:
        """The next backward is the batch's last: start each bucket's reduction when it is complete."""
        self.armed = True
        for b in self.buckets:
            b.pending = len(b.params)

    def _ready(self, p: nn.Parameter) -> None:
        if not self.armed or self.powersgd is not None:
            return
        b = self._bucket_of[id(p)]
        b.pending -= 1
        if b.pending == 0:
            self._launch(b)

    def _launch(self, b: _Bucket) -> None:
        if b.work is not None or self.dp.size == 1:
            return
        view = self.data[b.start:b.end]
        view.div_(self.dp.size)  # average over replicas
        b.wire = view if self.reduce_dtype == torch.float32 else view.to(self.reduce_dtype)
        b.work = dist.all_reduce(b.wire, group=self.dp.group, async_op=True)

    def finish(self) -> None:
        """Launch what has not started yet, wait for everything, leave averaged fp32 gradients."""
        if self.powersgd is not None:
            self.powersgd.reduce()
            self.armed = False
            return
        for b in self.buckets:
            self._launch(b)
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                if b.wire is not None and b.wire.dtype != torch.float32:
                    self.data[b.start:b.end].copy_(b.wire)
                b.work = b.wire = None
        self.armed = False

    def sent_bytes(self) -> float:
        """Ring all-reduce bytes one rank sends for one reduction of the whole buffer."""
        if self.powersgd is not None:
            return 2 * (self.dp.size - 1) / self.dp.size * self.powersgd.wire_numel() * 4
        n = self.data.numel() * torch.finfo(self.reduce_dtype).bits // 8
        return 2 * (self.dp.size - 1) / self.dp.size * n


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
    """ZeRO-1: AdamW whose state covers only this dp rank's 1/d slice of the flat parameter buffer."""

    def __init__(self, params: list[nn.Parameter], cfg: TrainConfig, dp: DPGroup):
        self.dp = dp
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        ordered = decay + no_decay
        total = sum(p.numel() for p in ordered)
        padded = -(-total // dp.size) * dp.size
        device = params[0].device
        self.flat = torch.zeros(padded, device=device, dtype=params[0].dtype)
        self.flat_grad = torch.zeros(padded, device=device, dtype=torch.float32)
        offset, bounds = 0, []
        for p in ordered:
            n = p.numel()
            self.flat[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + n].view_as(p)  # the model now reads the flat buffer
            bounds.append((p, offset))
            offset += n
        self.bounds = bounds
        self.decay_end = sum(p.numel() for p in decay)
        per = padded // dp.size
        self.lo, self.hi = dp.rank * per, (dp.rank + 1) * per
        groups = []
        for start, end, wd in ((0, self.decay_end, cfg.weight_decay), (self.decay_end, total, 0.0)):
            s, e = max(start, self.lo), min(end, self.hi)
            if s < e:
                shard = self.flat[s:e]
                shard.grad = self.flat_grad[s:e]
                groups.append({"params": [shard], "weight_decay": wd})
        self.inner = torch.optim.AdamW(groups or [{"params": [self.flat[:0]]}], lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:  # the GradBuffer owns the gradients
        return None

    def step(self) -> None:
        for p, offset in self.bounds:  # gather this rank's slice of the (reduced, clipped) gradients
            s, e = max(offset, self.lo), min(offset + p.numel(), self.hi)
            if s < e:
                self.flat_grad[s:e].copy_(p.grad.reshape(-1)[s - offset:e - offset])
        self.inner.step()
        if self.dp.size > 1:
            shard = self.flat[self.lo:self.hi].clone()
            dist.all_gather_into_tensor(self.flat, shard, group=self.dp.group)

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
