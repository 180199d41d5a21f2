"""Event-driven simulation of one training step of a layout on a cluster.

The simulator runs the exact per-rank action lists of megaloom/parallel/schedules.py, lowered with
their sends and receives (`lower`), one pipeline of t x p GPUs standing for all d replicas (they run
in lockstep):

- a compute action (F, B, I or W of a microbatch on a model chunk) takes the time `StageCosts` gives
  its virtual stage: GEMMs from the GEMM model, attention, memory-bound kernels and the tensor-parallel
  collectives inside each layer;
- a send is asynchronous and delivers after the p2p time between the two stages' GPUs (network model,
  with Megatron's scatter/gather of §4.1 when t > 1: each tp rank sends b·s·h/t on its own NIC and the
  receivers all-gather over NVLink); a receive waits for its delivery;
- data-parallel gradient reduction of a chunk starts when the chunk's last backward starts and runs
  bucket by bucket behind it (overlap with the last backward; the megatron-2021 recipe all-reduces the
  whole buffer after the pipeline is done, as Megatron-LM then did); ZeRO-1 reduce-scatters instead and
  all-gathers the updated weights after the optimizer; ZeRO-2/3 (FSDP2) gather each layer's weights
  one layer ahead of its compute, in forward (and ZeRO-3 again in backward), on a communication
  stream that hides them only behind the compute there is (`fsdp_pass_seconds`), and reduce-scatter
  once per step behind the last backward; on a device `megaloom calibrate` measured, each FSDP2 unit
  also costs its measured host work (`fsdp_unit_forward`/`_backward`);
- on a host-bound device (a CPU, one process per core) nothing overlaps: the cores that compute are the
  ones that move the bytes, so gathers and gradient reductions add to the compute;
- the optimizer step reads and writes the (sharded) fp32 state at the achieved memory bandwidth (and on
  a device `megaloom calibrate` measured, its fixed cost per step and per layer held).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

from megaloom.parallel.p2p_plan import P2PBatch, comm_plan
from megaloom.parallel.schedules import (
    Action,
    Costs,
    Op,
    Schedule,
    ScheduleError,
    ScheduleKind,
    SimResult,
    Span,
    build_schedule,
    in_flight,
    lower,
    stage_location,
    virtual_stage,
)
from megaloom.perf import flops
from megaloom.perf.collectives import Collective, collective_seconds
from megaloom.perf.costs import GIB, USABLE_MEMORY, Job, StageCosts, check_job
from megaloom.perf.megatron_plan import megatron_plan
from megaloom.perf.traffic import communication_by_stage, dp_group, global_sync_seconds, p2p_seconds

ADAM_BYTES_PER_PARAMETER = 30  # fused AdamW: read fp32 weight, grad, m, v (16), write weight, m, v (12), bf16 copy (2)


@dataclass
class Simulation:
    """One simulated step. Times in seconds, memory in bytes, communication in bytes per GPU per step."""

    job: Job
    step_time: float
    pipeline_time: float
    busy: tuple[float, ...]  # compute seconds per pipeline rank
    spans: list[tuple[int, float, float, int, int, int]]  # rank, start, end, op code, microbatch, chunk
    memory_by_rank: tuple[tuple[float, float, float], ...]  # (state, activations, peak total) per pipeline rank
    comm_bytes: dict[str, float]  # per kind, the most any GPU sends
    breakdown: dict[str, float]
    costs: StageCosts = field(repr=False)
    in_flight: list[int] = field(default_factory=list)  # peak microbatch-chunks held per rank
    comm_by_stage: list[dict[str, float]] = field(default_factory=list)  # {tp, pp, dp} per pipeline rank

    @cached_property
    def schedule_sim(self) -> SimResult:
        """The step as a schedules.SimResult in milliseconds, for observe.timeline's pictures."""
        lay, c = self.job.layout, self.costs.chunk(0)
        ops = (Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT)
        spans = tuple(Span(r, a * 1e3, b * 1e3, Action(ops[code], mb, ch)) for r, a, b, code, mb, ch in self.spans)
        sched, _ = compiled(lay.schedule_kind, lay.pp, self.job.microbatches, lay.chunks)
        p2p = p2p_seconds(self.job, 0, 1) * 1e3 if lay.pp > 1 else 0.0
        ms = Costs(c.forward * 1e3, c.backward * 1e3, c.backward_input * 1e3, c.backward_weight * 1e3, p2p)
        return SimResult(sched, ms, self.pipeline_time * 1e3, tuple(sorted(spans, key=lambda s: (s.rank, s.start))),
                         tuple(b * 1e3 for b in self.busy), tuple(self.in_flight))

    @cached_property
    def tokens_per_step(self) -> int:
        return self.job.global_batch * self.job.model.seq_len

    @property
    def bubble_fraction(self) -> float:
        """Idle time of the pipeline over its busiest rank's compute time (t_pb / t_id of §2.2.1)."""
        ideal = max(self.busy)
        return (self.pipeline_time - ideal) / ideal if ideal else 0.0

    @property
    def memory_per_gpu(self) -> float:
        return max(total for _, _, total in self.memory_by_rank)

    @property
    def fits(self) -> bool:
        return self.memory_per_gpu <= self.job.cluster.device.memory_gib * GIB * USABLE_MEMORY

    def report(self) -> dict:
        j, dev = self.job, self.job.cluster.device
        tokens_per_s = self.tokens_per_step / self.step_time
        model = flops.model_flops_per_token(j.model) * tokens_per_s / j.gpus
        hardware = hardware_flops_per_token(j) * tokens_per_s / j.gpus
        state, act, _ = max(self.memory_by_rank, key=lambda x: x[2])
        return {
            **j.layout.fields(),
            "gpus": j.gpus, "cluster": j.cluster.name, "gpu": dev.name, "global_batch": j.global_batch,
            "microbatches": j.microbatches, "recipe": j.recipe.name,
            "step_time_s": self.step_time,
            "tokens_per_s": tokens_per_s,
            "model_tflops_per_gpu": model / 1e12,
            "hardware_tflops_per_gpu": hardware / 1e12,
            "mfu": model / (dev.bf16_tflops * 1e12),
            "hfu": hardware / (dev.bf16_tflops * 1e12),
            "bubble_fraction": self.bubble_fraction,
            "memory_per_gpu_gib": self.memory_per_gpu / GIB,
            "memory_state_gib": state / GIB,
            "memory_state_gib_per_stage": [st / GIB for st, _, _ in self.memory_by_rank],
            "memory_activations_gib": act / GIB,
            "memory_capacity_gib": dev.memory_gib,
            "fits": self.fits,
            "comm_bytes_per_gpu": dict(self.comm_bytes),
            "comm_bytes_per_stage": [dict(c) for c in self.comm_by_stage],
            "time_breakdown_s": dict(self.breakdown),
        }


def hardware_flops_per_token(job: Job) -> float:
    """FLOPs executed per token: full recomputation reruns the forward (paper §5.1's 96 form), selective
    the attention scores and values (4·s·h per layer and token, Korthikanti et al. 2022 §5)."""
    m, mode = job.model, job.layout.recompute
    if mode == "selective":
        return flops.model_flops_per_token(m) + m.layers * 4 * m.seq_len * m.hidden
    return flops.hardware_flops_per_token(m, mode)


# ---------------------------------------------------------------- the event loop

_F, _B, _I, _W, _RECV, _SEND = range(6)
_CODE = {Op.FORWARD: _F, Op.BACKWARD: _B, Op.BACKWARD_INPUT: _I, Op.BACKWARD_WEIGHT: _W,
         Op.RECV_F: _RECV, Op.RECV_B: _RECV, Op.SEND_F: _SEND, Op.SEND_B: _SEND}


@lru_cache(maxsize=64)
def compiled(kind: ScheduleKind, p: int, m: int, v: int) -> tuple[Schedule, tuple[tuple[tuple[int, ...], ...], ...]]:
    """The schedule and, per rank, its lowered actions as plain tuples (code, microbatch, chunk, stage, key):
    the same lists, in a form the event loop walks quickly. `key` names a transfer: the receiving
    stage, the direction and the microbatch, identical on the sending and the receiving side."""
    schedule = build_schedule(kind, p, m, v)
    stages = p * v
    out = []
    for r, acts in enumerate(lower(schedule)):
        rows = []
        for a in acts:
            stage = virtual_stage(r, a.chunk, p)
            to = {Op.SEND_F: stage + 1, Op.SEND_B: stage - 1}.get(a.op, stage)
            backward = a.op in (Op.SEND_B, Op.RECV_B)
            rows.append((_CODE[a.op], a.microbatch, a.chunk, stage, (a.microbatch * stages + to) * 2 + backward, to))
        out.append(tuple(rows))
    return schedule, tuple(out)


_BATCH = 6


@lru_cache(maxsize=64)
def compiled_blocking(kind: ScheduleKind, p: int, m: int, v: int) -> tuple[tuple[int, ...], tuple[tuple[tuple, ...], ...]]:
    """The schedule's activations in flight per rank, and per rank the steps of the blocking program as
    plain tuples: a pass (code, microbatch, chunk, stage) or a batch (_BATCH, ((transfer, sender,
    receiver), ...)) posted and completed together. 1F1B and interleaved: Megatron-LM 2021's own program
    (`megatron_plan`); other schedules, which it did not have: `p2p_plan.comm_plan`'s batches, the plan
    megaloom's runtime runs under NCCL. Cached: the simulator walks it twice (with and without wire)."""
    schedule = build_schedule(kind, p, m, v)
    flight = tuple(in_flight(schedule))
    out = []
    if kind in (ScheduleKind.ONE_F_ONE_B, ScheduleKind.INTERLEAVED):
        for r, steps in enumerate(megatron_plan(p, m, v)):
            out.append(tuple((_BATCH, tuple((t, t[0], t[1]) for t in st[1])) if st[0] == "batch"
                             else ((_F if st[0] == "F" else _B), st[1], st[2], virtual_stage(r, st[2], p))
                             for st in steps))
        return flight, tuple(out)
    stages = p * v
    for r, steps in enumerate(comm_plan(schedule)):
        rows = []
        for st in steps:
            if isinstance(st, P2PBatch):
                ops = []
                for a in st.ops:
                    stage = virtual_stage(r, a.chunk, p)
                    to = {Op.SEND_F: stage + 1, Op.SEND_B: stage - 1}.get(a.op, stage)
                    backward = a.op in (Op.SEND_B, Op.RECV_B)
                    src = stage_location(to + 1 if backward else to - 1, p)[0]
                    ops.append(((a.microbatch * stages + to) * 2 + backward, src, stage_location(to, p)[0]))
                rows.append((_BATCH, tuple(ops)))
            else:
                rows.append((_CODE[st.op], st.microbatch, st.chunk, virtual_stage(r, st.chunk, p)))
        out.append(tuple(rows))
    return flight, tuple(out)


@dataclass
class PipelineRun:
    spans: list[tuple[int, float, float, int, int, int]]  # rank, start, end, code, microbatch, chunk
    busy: list[float]
    finish: list[float]
    peak_in_flight: list[int]
    last_backward: dict[int, tuple[float, float]]  # per virtual stage: (start, end) of its last B or W

    def record(self, r: int, now: float, d: float, code: int, mb: int, chunk: int, stage: int) -> float:
        """Rank r runs a pass of `d` seconds from `now`; returns when it ends."""
        self.spans.append((r, now, now + d, code, mb, chunk))
        self.busy[r] += d
        if code == _B or code == _W:
            self.last_backward[stage] = (now, now + d)
        return now + d

    def check_done(self, pos: list[int], lists: tuple, what: str) -> None:
        stuck = [r for r in range(len(pos)) if pos[r] < len(lists[r])]
        if stuck:
            raise ScheduleError(f"simulation of {what} deadlocked on ranks {stuck}")


def run_pipeline(job: Job, costs: StageCosts, with_p2p: bool = True) -> PipelineRun:
    """Walk every rank's lowered action list in order, each action as early as its rank and its inputs
    allow. `with_p2p=False`: transfers take no time (to tell exposed p2p from the bubble)."""
    lay = job.layout
    p, v = lay.pp, lay.chunks
    durations = [[pass_seconds(job, costs, s, code) for code in (_F, _B, _I, _W)] for s in range(p * v)]
    if not job.recipe.overlap_p2p and p > 1:
        return _run_blocking(job, durations, with_p2p)
    p2p = {}
    for s in range(p * v - 1):  # the time a transfer between stages s and s+1 takes, both ways
        p2p[s] = p2p_seconds(job, s % p, (s + 1) % p) if p > 1 and with_p2p else 0.0
    schedule, lists = compiled(lay.schedule_kind, p, job.microbatches, v)
    arrivals: dict[int, float] = {}
    clock, pos = [0.0] * p, [0] * p
    run = PipelineRun([], [0.0] * p, clock, list(in_flight(schedule)), {})
    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            acts, i, now = lists[r], pos[r], clock[r]
            n = len(acts)
            while i < n:
                code, mb, chunk, stage, key, to = acts[i]
                if code == _RECV:
                    if key not in arrivals:
                        break
                    now = max(now, arrivals.pop(key))
                elif code == _SEND:
                    arrivals[key] = now + p2p[min(stage, to)]
                else:
                    now = run.record(r, now, durations[stage][code], code, mb, chunk, stage)
                i += 1
            if i != pos[r]:
                progressed = True
            pos[r], clock[r] = i, now
    run.check_done(pos, lists, lay.schedule_kind.value)
    return run


def _run_blocking(job: Job, durations: list[list[float]], with_p2p: bool) -> PipelineRun:
    """The walk under blocking, batch-synchronous p2p (Megatron-LM 2021: each `batch_isend_irecv` of the
    program waited for, then `torch.cuda.synchronize()`; see Recipe.overlap_p2p and megatron_plan.py):
    a rank posts its batch when it reaches it and goes on only when every transfer of the batch is done,
    and a transfer starts once both its ends are posted (NCCL holds a send until the receive is posted)."""
    lay = job.layout
    p = lay.pp
    flight, lists = compiled_blocking(lay.schedule_kind, p, job.microbatches, lay.chunks)
    wire = {(a, b): p2p_seconds(job, a, b) if with_p2p else 0.0 for a in range(p) for b in ((a + 1) % p, (a - 1) % p)}
    posted: dict = {}  # transfer -> the times its ends were posted
    clock, pos, waiting = [0.0] * p, [0] * p, [False] * p
    run = PipelineRun([], [0.0] * p, clock, list(flight), {})
    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            steps, i, now = lists[r], pos[r], clock[r]
            while i < len(steps):
                step = steps[i]
                if step[0] == _BATCH:
                    if not waiting[r]:
                        for key, _, _ in step[1]:
                            posted.setdefault(key, []).append(now)
                        waiting[r] = progressed = True
                    if any(len(posted[key]) < 2 for key, _, _ in step[1]):
                        break
                    now = max(now, max(max(posted[key]) + wire[a, b] for key, a, b in step[1]))
                    waiting[r] = False
                else:
                    code, mb, chunk, stage = step
                    now = run.record(r, now, durations[stage][code], code, mb, chunk, stage)
                i += 1
                progressed = True
            pos[r], clock[r] = i, now
    run.check_done(pos, lists, f"blocking {lay.schedule_kind.value}")
    return run


def pass_seconds(job: Job, costs: StageCosts, stage: int, code: int) -> float:
    """One microbatch's pass (F, B, I or W) through virtual stage `stage`: its compute, and under
    ZeRO-2/3 the weight gathers FSDP2 puts in front of each layer (`fsdp_pass_seconds`) and, on a device
    `megaloom calibrate` measured, each unit's own work (hooks, copy-in and copy-out, the reduce-scatter's setup)."""
    t = costs.chunk(stage)
    d = (t.forward, t.backward, t.backward_input, t.backward_weight)[code]
    lay = job.layout
    if lay.zero < 2 or lay.dp == 1 or code not in (_F, _B):
        return d
    dev = job.cluster.device
    unit = dev.overhead("fsdp_unit_forward" if code == _F else
                        "fsdp_unit_backward" if lay.zero == 3 else "fsdp_unit_backward_zero2")
    per_layer = costs.layer.forward if code == _F else costs.layer.backward
    layers = costs.stage_layers(stage)
    root = costs.stage_parameters(stage) - layers * costs.layer_rank_parameters
    units = layers + (1 if root else 0)
    if lay.zero == 2 and code == _B:  # ZeRO-2 keeps a forward's gathered weights for the backward: no gathers
        return d + units * unit if dev.host_bound else d - layers * per_layer + layers * max(per_layer, unit)
    group, wire = dp_group(job, 0), job.activation_bytes  # gathered in the compute dtype
    gather = collective_seconds(job.cluster, Collective.ALL_GATHER, costs.layer_rank_parameters * wire, group)
    gather_root = collective_seconds(job.cluster, Collective.ALL_GATHER, root * wire, group) if root else 0.0
    if dev.host_bound:  # the cores that compute are the ones that move the bytes: nothing hides
        return d + gather_root + layers * gather + units * unit
    # on a GPU a unit's host work runs while the unit before it computes: it only shows when it is the longer
    return fsdp_pass_seconds(layers, max(per_layer, unit), d - layers * per_layer, gather, gather_root)


def fsdp_pass_seconds(layers: int, per_layer: float, root: float, gather: float, gather_root: float) -> float:
    """A pass through `layers` FSDP units (one per layer, `per_layer` compute seconds each) and the
    root unit (embedding, final norm, head: `root` seconds of compute) on two streams, as FSDP2 runs
    it: the root's weights are gathered first, then the first layer's; each further layer's gather
    is issued when the layer before it starts computing (one unit of prefetch: at most two layers
    gathered at once), and a layer computes once its gather is done. Communication hides behind
    compute only up to the compute there is: a comm-bound pass takes the sum of its gathers plus one
    layer, a compute-bound one the sum of its compute plus the first gathers."""
    comm = gather_root
    clock = comm + root  # the root's work (placed first: the gathers of the layers overlap with it)
    comm += gather
    for i in range(layers):
        start = max(clock, comm)
        if i + 1 < layers:
            comm = start + gather  # the next layer's gather, issued as this one starts
        clock = start + per_layer
    return clock


def finish_step(job: Job, costs: StageCosts, r: int, finish: float,
                last_backward: list[tuple[float, float]]) -> tuple[float, float, float]:
    """When pipeline rank r is done with the step: gradient reduction over dp, behind each chunk's last
    backward (bucket by bucket, or FSDP unit by unit: it starts with the pass and its last bucket
    leaves when the pass ends; under ZeRO-3 it also waits for that pass's own gathers on the network),
    then the optimizer, then ZeRO-1's gather of the updated weights (ZeRO-2/3 gather them in the next
    forwards, `pass_seconds`). Returns (end, exposed comm, optimizer)."""
    lay, c = job.layout, job.cluster
    params, group, d = costs.rank_parameters(r), dp_group(job, r), lay.dp
    comm_free = 0.0
    grad = 2 if job.grad_reduce_dtype == "bf16" else 4
    if d > 1 and lay.zero == 0 and not job.recipe.overlap_grad_reduce:
        # one all-reduce of the whole gradient buffer once the pipeline is done (Megatron-LM 2021)
        comm_free = finish + collective_seconds(c, Collective.ALL_REDUCE, params * grad, group)
    elif d > 1 and c.device.host_bound:
        # a host-bound device (a CPU, one process per core) has no idle core to move the bytes while it computes:
        # each chunk's reduction runs after the backward, one after another
        op = Collective.ALL_REDUCE if lay.zero == 0 else Collective.REDUCE_SCATTER
        comm_free = finish + sum(collective_seconds(c, op, costs.stage_parameters(virtual_stage(r, ch, lay.pp)) * grad,
                                                    group) for ch in range(len(last_backward)))
    elif d > 1:
        op = Collective.ALL_REDUCE if lay.zero == 0 else Collective.REDUCE_SCATTER
        for ch, (start, end) in sorted(enumerate(last_backward), key=lambda x: x[1][1]):
            stage = virtual_stage(r, ch, lay.pp)
            chunk_params, layers = costs.stage_parameters(stage), max(1, costs.stage_layers(stage))
            share = collective_seconds(c, op, chunk_params * grad, group)
            begin = max(comm_free, start)
            if lay.zero == 3:  # the reduce-scatters queue behind this backward's own gathers on the network
                begin += collective_seconds(c, Collective.ALL_GATHER, chunk_params * job.activation_bytes, group)
            comm_free = max(begin + share, end + share / layers)
    grads_done = max(finish, comm_free)
    opt = params / (d if lay.zero else 1) * ADAM_BYTES_PER_PARAMETER / c.device.copy_bytes_per_s
    dev = c.device
    if dev.overheads:  # the optimizer's measured fixed cost: one part per step, one per layer held
        per_layer = dev.overhead("optimizer_layer") + (dev.overhead("fsdp_optimizer_layer") if lay.zero >= 2 and d > 1
                                                        else 0.0)  # FSDP2's sharded parameters
        fixed = dev.overhead("optimizer_base") + per_layer * sum(costs.rank_layers(r))
        opt = dev.with_fixed(opt, fixed)
    weights = 4 if job.recipe.fp32_weights else 2
    after = collective_seconds(c, Collective.ALL_GATHER, params * weights, group) if lay.zero == 1 and d > 1 else 0.0
    return grads_done + opt + after, grads_done - finish + after, opt


def simulate_job(job: Job) -> Simulation:
    lay, m, c = job.layout, job.model, job.cluster
    check_job(m, job.gpus, job.global_batch, lay, c)
    costs = StageCosts(job)
    run = run_pipeline(job, costs)
    busy, clock, peak, last_backward = run.busy, run.finish, run.peak_in_flight, run.last_backward
    pipeline_time = max(clock)
    p, v = lay.pp, lay.chunks
    ends, opts = [], []
    for r in range(p):
        end, _, opt = finish_step(job, costs, r, clock[r], [last_backward[virtual_stage(r, ch, p)] for ch in range(v)])
        ends.append(end)
        opts.append(opt)
    last = max(range(p), key=lambda r: ends[r])  # the rank that finishes the step decides its tail
    opt_time = opts[last]
    dp_exposed = max(0.0, ends[last] - pipeline_time - opt_time)
    sync = global_sync_seconds(job)
    step = max(ends) + sync
    memory_by_rank = tuple(costs.memory_bytes(r, peak[r]) for r in range(p))
    no_wire = max(run_pipeline(job, costs, with_p2p=False).finish) if p > 1 else pipeline_time
    busiest = max(range(p), key=lambda r: busy[r])
    compute = sum(costs.chunk(s).forward + costs.chunk(s).backward for s in range(busiest, p * v, p)) * job.microbatches
    by_stage = communication_by_stage(job, costs)
    comm = {k: max(st[k] for st in by_stage) for k in ("tp", "pp", "dp")}
    mean = sum(costs.chunk(s).tp_comm for s in range(p * v)) / p * job.microbatches
    breakdown = {
        "compute": compute - mean,
        "tp_comm": mean,
        "zero_gather_exposed": max(busy) - compute,  # ZeRO-2/3 gathers compute could not hide
        "pp_p2p_exposed": max(0.0, pipeline_time - no_wire),
        "pipeline_bubble": min(no_wire, pipeline_time) - max(busy),
        "dp_comm_exposed": dp_exposed,
        "optimizer": opt_time,
        "global_sync": sync,  # the tied embedding's sum over first and last stage, the step's scalars
    }
    return Simulation(job, step, pipeline_time, tuple(busy), run.spans, memory_by_rank, comm, breakdown, costs,
                      list(peak), by_stage)
