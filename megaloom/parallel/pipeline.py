"""The pipeline runtime: executes one rank's action list (from `schedules.py`) with batched p2p.

Megatron-LM paper §2.2 (reference/004). The schedule is data: `lower()` turns the per-rank compute
order into compute + send/receive actions, and `p2p_plan.comm_plan()` groups those transfers into
`batch_isend_irecv` batches that cannot deadlock even when a grouped send blocks until its receive is
posted (NCCL): each send goes out right after the pass that produced it, together with the receives
that its neighbours' passes finishing at the same moment produce (Megatron's
send_forward_recv_backward pairing; receives are pre-posted). This interpreter runs that plan.
A receive is waited for just before the pass that needs it, sends in the background until the end
of the step; with `parallel.strict_p2p` every batch is waited for at once, NCCL's blocking rule.

Wire dtype: the autocast dtype (bf16 under bf16), else the residual stream's dtype. Under autocast
the residual stream stays fp32 (fp32 parameters), so activations and their gradients are cast to
bf16 for the wire and back to the receiving stage's dtype on receipt: half the bytes, as Megatron.

Scatter/gather (paper §4.1): with tensor parallelism the tensor sent between stages is replicated on
the t ranks of a stage, so each tp rank sends only its 1/t slice to its peer, and the receiving stage
rebuilds the whole with an all-gather over its tp group (fast NVLink) — b·s·h/t per inter-node link
instead of b·s·h. Under sequence parallelism the tensor is already split along the sequence, so each
rank simply sends its own part.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megaloom.layout import stage_layers
from megaloom.parallel.comm import CommCounter, TPGroup
from megaloom.parallel.p2p_plan import P2PBatch, comm_plan
from megaloom.parallel.schedules import Action, Op, Schedule, virtual_stage
from megaloom.parallel.wgrad import WeightGradStore
from megaloom.precision import DTYPES, autocast


@dataclass
class StageLink:
    """How this rank reaches the other stages of its pipeline."""

    pp_rank: int
    pp: int
    peers: list[int]  # global rank of pipeline rank q (same tp and dp coordinates)
    tp: TPGroup | None = None

    @property
    def scatter(self) -> bool:
        return self.tp is not None and self.tp.size > 1 and not self.tp.sequence_parallel


@dataclass
class _MicroState:
    inputs: torch.Tensor | None = None   # what F consumed (requires grad past the first stage)
    output: torch.Tensor | None = None   # F's output, or the scaled loss on the last stage
    grad: torch.Tensor | None = None     # gradient of `output` received from the next stage
    pending: list = field(default_factory=list)  # posted receives for it: (action, works, buffer)


@dataclass
class PipelineStats:
    peak_in_flight: int = 0   # most micro-batch-chunks holding activations at once
    sent_bytes: float = 0.0   # p2p bytes this rank sent this step
    batches: int = 0          # batch_isend_irecv calls this step
    sends: list[tuple[torch.dtype, int]] = field(default_factory=list)  # (dtype, elements) of each send
    trace: list[str] = field(default_factory=list)  # the plan's steps as executed: passes and p2p batches


def next_token_call(chunk: nn.Module, inputs: torch.Tensor, micro: tuple[torch.Tensor, ...], last: bool = True,
                    **kwargs) -> torch.Tensor:
    """How a chunk runs one micro-batch of next-token prediction: `micro` is (token ids, targets) or, with
    packed documents, (token ids, targets, document ids) (every stage gets the document ids); the last
    stage returns what the model returns for targets (the mean loss, or logits when they are None)."""
    _, y, *docs = micro
    if docs:
        kwargs = {**kwargs, "docs": docs[0]}
    return chunk(inputs, y, **kwargs) if last else chunk(inputs, **kwargs)


class PipelineRunner:
    """Runs the training (or forward-only) actions of one pipeline rank over its model chunks.

    `call(chunk, inputs, micro, last, **kwargs)` runs one micro-batch through one chunk (the training
    objective's: megaloom/train/objective.py); next-token prediction unless the trainer sets it.
    Evaluation and generation (`forward_outputs`) always use next-token prediction's."""

    def __init__(self, chunks: list[nn.Module], schedule: Schedule, link: StageLink, act_shape: tuple[int, ...],
                 device: torch.device, strict_p2p: bool = False):
        self.chunks, self.schedule, self.link = chunks, schedule, link
        self.act_shape, self.device = act_shape, device  # (micro_batch, local seq, hidden)
        self.strict_p2p = strict_p2p  # parallel.strict_p2p: wait for every batch right after issuing it
        self.call = next_token_call
        self.train_plan = comm_plan(schedule)[link.pp_rank]  # the same transfers, batched NCCL-safe
        # the residual stream's dtype (fp32 parameters: fp32 even under autocast); the wire may be narrower
        floats = [p.dtype for c in chunks for p in c.parameters() if p.is_floating_point()]
        self.residual_dtype = floats[0] if floats else torch.float32
        self.wire_dtype = self.residual_dtype
        self.n_stages = schedule.pp * schedule.chunks
        self.stats = PipelineStats()
        self.counter = CommCounter()  # p2p bytes this rank sent (op "send"), across steps until taken
        # zero-bubble schedules split the backward: weight gradients wait in the store for the W pass
        split = any(a.op is Op.BACKWARD_INPUT for acts in schedule.actions for a in acts)
        self.wgrad = WeightGradStore() if split else None
        # the data-parallel reduction of a chunk: armed just before its last backward of the step (B,
        # or I under zero-bubble), started for whatever is left right after its last B or W
        self.before_last_backward: Callable[[int], None] | None = None
        self.after_last_backward: Callable[[int], None] | None = None
        acts = schedule.actions[link.pp_rank]
        self._arm_at = {[a for a in acts if a.chunk == c and a.op in (Op.BACKWARD, Op.BACKWARD_INPUT)][-1]
                        for c in range(schedule.chunks)}
        self._done_at = {[a for a in acts if a.chunk == c and a.op in (Op.BACKWARD, Op.BACKWARD_WEIGHT)][-1]
                         for c in range(schedule.chunks)}

    # ------------------------------------------------------------------ public

    def forward_backward(self, microbatches: list[tuple[torch.Tensor, ...]], precision: str,
                         loss_scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of every micro-batch, (inputs, targets) or, with packed documents, (inputs,
        targets, document ids); returns the summed mean loss (last stage; 0 elsewhere)."""
        return self._run(self.train_plan, microbatches, precision, loss_scale, train=True)

    @torch.no_grad()
    def forward_only(self, microbatches: list[tuple[torch.Tensor, ...]], precision: str) -> torch.Tensor:
        """Mean loss over any number of micro-batches (last stage; 0 elsewhere): chunk by chunk, all
        micro-batches through each, with its own communication plan."""
        p, v, m = self.schedule.pp, self.schedule.chunks, len(microbatches)
        order = tuple(tuple(Action(Op.FORWARD, mb, c) for c in range(v) for mb in range(m)) for _ in range(p))
        plan = comm_plan(Schedule("forward-only", p, m, v, order))[self.link.pp_rank]
        return self._run(plan, microbatches, precision, 1.0, train=False)

    @torch.no_grad()
    def forward_outputs(self, microbatches: list[tuple[torch.Tensor, torch.Tensor | None]], precision: str,
                        chunk_kwargs: list[dict] | None = None) -> list[torch.Tensor | None]:
        """Forward only, for evaluation and generation: what the last stage returns for each micro-batch
        (`chunk(x, y, **chunk_kwargs[c])`: per-token losses under reduction="none", logits when y is None);
        None on the other ranks. The micro-batches may have any shape (B, T), one for all of them in a
        call, and every rank of the pipeline passes the same shapes (the first stage also the tokens);
        `chunk_kwargs[c]` go to every call of chunk c (its KV cache, the reduction)."""
        b, t = microbatches[0][0].shape[:2]
        tp = self.link.tp
        local_t = t // tp.size if tp is not None and tp.sequence_parallel else t
        outputs: list[torch.Tensor | None] = [None] * len(microbatches)
        p, v, m = self.schedule.pp, self.schedule.chunks, len(microbatches)
        order = tuple(tuple(Action(Op.FORWARD, mb, c) for c in range(v) for mb in range(m)) for _ in range(p))
        plan = comm_plan(Schedule("forward-only", p, m, v, order))[self.link.pp_rank]
        train_shape, self.act_shape = self.act_shape, (b, local_t, self.act_shape[-1])
        try:
            self._run(plan, microbatches, precision, 1.0, train=False, outputs=outputs, chunk_kwargs=chunk_kwargs)
        finally:
            self.act_shape = train_shape
        return outputs

    # ------------------------------------------------------------------ interpreter

    def _run(self, plan, microbatches, precision, loss_scale, train, outputs=None, chunk_kwargs=None):
        if train and len(microbatches) != self.schedule.microbatches:
            raise ValueError(f"the schedule has {self.schedule.microbatches} micro-batches, got {len(microbatches)}")
        self.stats = PipelineStats()
        self._wire_shape = self._shape(chunk_kwargs)
        # on the wire: the autocast dtype (bf16 under bf16), else the residual stream's own dtype
        self.wire_dtype = DTYPES[precision] if precision != "fp32" else self.residual_dtype
        states: dict[tuple[int, int], _MicroState] = {}
        total = torch.zeros((), device=self.device)
        sends: list[dist.Work] = []
        for a in plan:
            self.stats.trace.append(str(a))
            if isinstance(a, P2PBatch):
                self._communicate(a.ops, states, sends)
                continue
            st = states.setdefault((a.microbatch, a.chunk), _MicroState())
            self._finish_receives(st)
            if a.op is Op.FORWARD:
                total += self._forward(a, st, microbatches, precision, loss_scale, train, outputs, chunk_kwargs)
                in_flight = sum(1 for s in states.values() if s.output is not None)
                self.stats.peak_in_flight = max(self.stats.peak_in_flight, in_flight)
            else:
                if a in self._arm_at and self.before_last_backward is not None:
                    self.before_last_backward(a.chunk)
                self._backward(a, st)
                if a in self._done_at and self.after_last_backward is not None:
                    self.after_last_backward(a.chunk)
            if a.op in (Op.BACKWARD, Op.BACKWARD_WEIGHT) or (not train and self._is_last(a)):
                st.output = st.grad = None  # this micro-batch's activations are released
        for w in sends:
            w.wait()
        return total

    def _is_first(self, a: Action) -> bool:
        return virtual_stage(self.link.pp_rank, a.chunk, self.link.pp) == 0

    def _is_last(self, a: Action) -> bool:
        return virtual_stage(self.link.pp_rank, a.chunk, self.link.pp) == self.n_stages - 1

    def _forward(self, a, st, microbatches, precision, loss_scale, train, outputs=None,
                 chunk_kwargs=None) -> torch.Tensor:
        micro = microbatches[a.microbatch]  # every stage reads its own copy (token ids first)
        chunk = self.chunks[a.chunk]
        kwargs = chunk_kwargs[a.chunk] if chunk_kwargs is not None else {}
        if self._is_first(a):
            st.inputs = micro[0]
        elif train:
            st.inputs.requires_grad_(True)
        record = self.wgrad.recording((a.microbatch, a.chunk)) if self.wgrad and train else contextlib.nullcontext()
        call = next_token_call if outputs is not None else self.call
        with autocast(precision, self.device), record:
            out = call(chunk, st.inputs, micro, self._is_last(a), **kwargs)
        if self._is_last(a) and outputs is not None:  # forward_outputs: keep what the last stage returned
            outputs[a.microbatch] = out
            return torch.zeros((), device=self.device)
        if self._is_last(a):
            st.output = out / len(microbatches) * loss_scale
            return out.detach().float() / len(microbatches)
        st.output = out
        return torch.zeros((), device=self.device)

    def _backward(self, a: Action, st: _MicroState) -> None:
        grad = None if self._is_last(a) else st.grad
        if a.op is Op.BACKWARD:
            torch.autograd.backward(st.output, grad)
        elif a.op is Op.BACKWARD_INPUT:
            # zero-bubble: the input gradient now (the previous stage waits for it); the weight-gradient
            # GEMMs are stashed (recomputed forwards inside this backward are recorded too)
            key = (a.microbatch, a.chunk)
            with self.wgrad.recording(key), self.wgrad.deferred():
                torch.autograd.backward(st.output, grad)
        else:  # BACKWARD_WEIGHT: only the stashed weight-gradient GEMMs, no graph walk, no collective
            self.wgrad.flush((a.microbatch, a.chunk))

    # ------------------------------------------------------------------ p2p

    def _communicate(self, comm: tuple[Action, ...], states, sends: list) -> None:
        ops, recvs = [], []
        for a in comm:
            st = states.setdefault((a.microbatch, a.chunk), _MicroState())
            peer = self.link.peers[a.peer]
            if a.op is Op.SEND_F:
                ops.append(dist.P2POp(dist.isend, self._outgoing(st.output.detach()), peer))
            elif a.op is Op.SEND_B:
                ops.append(dist.P2POp(dist.isend, self._outgoing(st.inputs.grad), peer))
                st.inputs = None
            else:
                buf = torch.empty(self._wire_numel(), dtype=self.wire_dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, peer))
                recvs.append((a, st, buf))
        works = dist.batch_isend_irecv(ops)
        self.stats.batches += 1
        for op in ops:
            if op.op is dist.isend:
                nbytes = op.tensor.numel() * op.tensor.element_size()
                self.stats.sent_bytes += nbytes
                self.counter.add_sent("send", nbytes)
                self.stats.sends.append((op.tensor.dtype, op.tensor.numel()))
        if self.strict_p2p:  # NCCL's rule on any backend: the whole batch completes before anything else
            for w in works:
                w.wait()  # once only: a second wait on a gloo work waits for a second message
            works = []
        if not works:
            per_op = [[]] * len(recvs)
        elif len(works) == len(ops):  # one work per op (gloo)
            sends += [w for op, w in zip(ops, works) if op.op is dist.isend]
            per_op = [[w] for op, w in zip(ops, works) if op.op is dist.irecv]
        else:  # NCCL coalesces the batch into one work covering the receives too (its waits are idempotent)
            sends += works
            per_op = [works] * len(recvs)
        for (a, st, buf), w in zip(recvs, per_op):
            st.pending.append((a, w, buf))  # waited for just before the pass that needs it

    def _finish_receives(self, st: _MicroState) -> None:
        for a, works, buf in st.pending:
            for w in works:
                w.wait()
            full = self._incoming(buf)
            if a.op is Op.RECV_F:
                st.inputs = full.to(self.residual_dtype)  # back to the residual stream's dtype
            else:
                st.grad = full.to(st.output.dtype)  # the gradient of what this stage produced, in its dtype
        st.pending.clear()

    def _shape(self, chunk_kwargs: list[dict] | None) -> tuple[int, ...]:
        """The activations' shape this run: `act_shape`, longer by the tokens the model puts before the
        inputs (prompt tuning's soft prompt, `Transformer.prepended`; split over tp under sequence
        parallelism like the rest of the sequence)."""
        cache = chunk_kwargs[0].get("cache") if chunk_kwargs else None
        extra = self.chunks[0].prepended(cache) if hasattr(self.chunks[0], "prepended") else 0
        tp = self.link.tp
        if extra and tp is not None and tp.sequence_parallel:
            extra //= tp.size
        b, t, h = self.act_shape
        return (b, t + extra, h)

    def _wire_numel(self) -> int:
        n = 1
        for d in self._wire_shape:
            n *= d
        return n // self.link.tp.size if self.link.scatter else n

    def _outgoing(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.to(self.wire_dtype).contiguous().reshape(-1)
        if self.link.scatter:  # send only this tp rank's slice
            return flat.chunk(self.link.tp.size)[self.link.tp.rank].contiguous()
        return flat

    def _incoming(self, buf: torch.Tensor) -> torch.Tensor:
        if self.link.scatter:  # rebuild the replicated tensor from the tp ranks' slices
            parts = [torch.empty_like(buf) for _ in range(self.link.tp.size)]
            dist.all_gather(parts, buf, group=self.link.tp.group)
            self.link.tp.counter.add("all_gather", buf.numel() * buf.element_size() * self.link.tp.size,
                                     self.link.tp.size)
            buf = torch.cat(parts)
        return buf.view(self._wire_shape).detach()


def rank_chunk_layers(pp_rank: int, pp: int, chunks: int, stages: list[range]) -> list[range]:
    """The layers of each model chunk this pipeline rank holds."""
    return [stages[virtual_stage(pp_rank, c, pp)] for c in range(chunks)]


__all__ = ["PipelineRunner", "PipelineStats", "StageLink", "rank_chunk_layers", "stage_layers"]
