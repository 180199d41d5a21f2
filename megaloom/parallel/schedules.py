"""Pipeline schedules as data: per-rank action lists, lowered to p2p, checked by a simulator.

Narayanan et al. 2021 (reference/004), §2.2: a batch of m microbatches flows through p pipeline
stages and the optimizer step waits for a flush, so every schedule pays a *bubble* of idle time.

- GPipe (§2.2.1): all forwards, then all backwards. Bubble (p-1)/m of the ideal time, but the
  activations of all m microbatches are alive at once.
- 1F1B / PipeDream-Flush (§2.2.1): the same bubble, but after a short warm-up each rank alternates
  one forward with one backward, so at most p microbatches are in flight.
- Interleaved 1F1B (§2.2.2): each rank holds v model chunks (rank r holds stages r, r+p, ...), so
  a chunk's forward and backward take t_f/v and t_b/v and the bubble shrinks to (p-1)/(m·v), at v
  times the p2p traffic. Megatron requires m to be a multiple of p.
- ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", §3): the backward is split into I
  (gradient of the input, on the critical path) and W (gradient of the weights, which nothing
  downstream waits for); deferring W's fills the cool-down bubble at 1F1B's peak memory.

A schedule holds COMPUTE actions only; `lower` inserts the sends and receives they imply and the
runtime interprets the lowered lists. `simulate` runs the lists against a cost model in one process,
which is how the tests check bubble sizes, in-flight memory and freedom from deadlock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from megaloom.layout import ScheduleKind, check_schedule


class Op(enum.Enum):
    """One step of a pipeline rank: a compute pass or a point-to-point transfer."""

    FORWARD = "F"
    BACKWARD = "B"  # input and weight gradients together
    BACKWARD_INPUT = "I"  # zero-bubble: input gradient only, what the previous stage waits for
    BACKWARD_WEIGHT = "W"  # zero-bubble: weight gradient, no one waits for it
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE

    @property
    def is_comm(self) -> bool:
        return not self.is_compute

    @property
    def is_backward(self) -> bool:
        """B or I: the pass that produces the gradient sent to the previous stage."""
        return self in (Op.BACKWARD, Op.BACKWARD_INPUT)


_COMPUTE = frozenset({Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT})


@dataclass(frozen=True)
class Action:
    """One op on one (microbatch, chunk). `peer` is the pipeline rank a comm op talks to."""

    op: Op
    microbatch: int
    chunk: int = 0
    peer: int | None = None

    def __str__(self) -> str:
        # "0F3" as in torch.distributed.pipelining (chunk, op, microbatch); comms show their peer
        if self.op.is_compute:
            return f"{self.chunk}{self.op.value}{self.microbatch}"
        arrow = "->" if self.op in (Op.SEND_F, Op.SEND_B) else "<-"
        return f"{self.op.value}({self.chunk},{self.microbatch}){arrow}{self.peer}"


@dataclass(frozen=True)
class Schedule:
    """Per pipeline rank, the compute actions in execution order."""

    name: str
    pp: int
    microbatches: int
    chunks: int
    actions: tuple[tuple[Action, ...], ...]

    def __str__(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))


class ScheduleError(ValueError):
    """A schedule that is incomplete or deadlocks; one line naming the offending actions."""


def virtual_stage(rank: int, chunk: int, pp: int) -> int:
    """Chunk c of rank r is stage c·p + r (§2.2.2, Fig. 4: rank 0 holds stages 0 and p)."""
    return chunk * pp + rank


def stage_location(stage: int, pp: int) -> tuple[int, int]:
    """(rank, chunk) holding a virtual stage; the inverse of `virtual_stage`."""
    return stage % pp, stage // pp


# ---------------------------------------------------------------- schedules


def _fwd(mb: int, chunk: int = 0) -> Action:
    return Action(Op.FORWARD, mb, chunk)


def _bwd(mb: int, chunk: int = 0, op: Op = Op.BACKWARD) -> Action:
    return Action(op, mb, chunk)


def gpipe(p: int, m: int) -> Schedule:
    """All m forwards, then all m backwards (§2.2.1, Fig. 3): m microbatches in flight on every rank."""
    rank = tuple(_fwd(i) for i in range(m)) + tuple(_bwd(i) for i in range(m))
    return Schedule(ScheduleKind.GPIPE.value, p, m, 1, (rank,) * p)


def one_f_one_b(p: int, m: int) -> Schedule:
    """PipeDream-Flush (§2.2.1, Fig. 4 top).

    Rank r runs min(p-r-1, m) warm-up forwards: exactly enough that the first backward, coming back
    from the last stage, finds it busy. Then one forward, one backward until the forwards run out,
    then the cool-down backwards. At most p-r microbatches are in flight on rank r.
    """
    ranks = []
    for r in range(p):
        warm = min(p - r - 1, m)
        acts = [_fwd(i) for i in range(warm)]
        for i in range(m - warm):
            acts += [_fwd(warm + i), _bwd(i)]
        acts += [_bwd(i) for i in range(m - warm, m)]
        ranks.append(tuple(acts))
    return Schedule(ScheduleKind.ONE_F_ONE_B.value, p, m, 1, tuple(ranks))


def _interleaved_slot(k: int, p: int, v: int, forward: bool) -> tuple[int, int]:
    """(microbatch, chunk) of a rank's k-th forward (or backward), as Megatron-LM orders them.

    Microbatches go in groups of p: chunk 0 runs microbatches 0..p-1, then chunk 1 runs the same
    group, ..., then chunk 0 runs the next group. Backwards visit the chunks in reverse.
    """
    group, within = divmod(k, p * v)
    chunk = within // p
    return group * p + within % p, chunk if forward else v - 1 - chunk


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Megatron-LM's interleaved 1F1B (§2.2.2, Fig. 4 bottom); m must be a multiple of p.

    Rank r runs 2(p-r-1) + (v-1)·p warm-up forwards (capped at m·v), the count of Megatron's
    `forward_backward_pipelining_with_interleaving`, then alternates forward and backward. With
    v = 1 that warm-up would be deeper than needed, so v = 1 returns the plain 1F1B schedule.
    """
    if v == 1:
        return one_f_one_b(p, m)
    if m % p:
        raise ScheduleError(f"interleaved 1F1B needs microbatches ({m}) to be a multiple of pp ({p})")
    total = m * v
    ranks = []
    for r in range(p):
        warm = min(2 * (p - r - 1) + (v - 1) * p, total)
        acts = [_fwd(*_interleaved_slot(k, p, v, True)) for k in range(warm)]
        for i in range(total - warm):
            acts += [_fwd(*_interleaved_slot(warm + i, p, v, True)), _bwd(*_interleaved_slot(i, p, v, False))]
        acts += [_bwd(*_interleaved_slot(k, p, v, False)) for k in range(total - warm, total)]
        ranks.append(tuple(acts))
    return Schedule(ScheduleKind.INTERLEAVED.value, p, m, v, tuple(ranks))


def zero_bubble_h1(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, §3.1, Fig. 3 top): 1F1B with the backward split into I and W.

    Rank r keeps 1F1B's min(p-r-1, m) warm-up forwards and its F, I rhythm, but runs the W of
    microbatch j only after the I of microbatch j+r. Rank r holds p-r microbatches under 1F1B, so
    holding r more keeps every rank at or below p, 1F1B's peak (rank 0). The deferred W's fill the
    cool-down gaps, where a rank waits for I's from downstream: with t_F = t_I = t_W the bubble
    drops from (p-1)·(t_F+t_B) to (p-1)·(t_F+t_I-t_W), a third of 1F1B's, once m >= p.
    """
    ranks = []
    for r in range(p):
        warm = min(p - r - 1, m)
        acts = [_fwd(i) for i in range(warm)]
        done_w = 0
        for i in range(m):
            if warm + i < m:
                acts.append(_fwd(warm + i))
            acts.append(_bwd(i, op=Op.BACKWARD_INPUT))
            if i - done_w >= r:  # this W is r I's old: run it now
                acts.append(_bwd(done_w, op=Op.BACKWARD_WEIGHT))
                done_w += 1
        acts += [_bwd(j, op=Op.BACKWARD_WEIGHT) for j in range(done_w, m)]
        ranks.append(tuple(acts))
    return Schedule(ScheduleKind.ZB_H1.value, p, m, 1, tuple(ranks))


def build_schedule(kind: ScheduleKind | str, p: int, m: int, v: int = 1) -> Schedule:
    """The schedule for a config, with one-line errors naming the config keys and their values.

    Interleaved with v = 1 is accepted and is 1F1B (one chunk per rank leaves nothing to interleave).
    """
    kind = check_schedule(kind, p, m, v)
    if kind is ScheduleKind.GPIPE:
        return gpipe(p, m)
    if kind is ScheduleKind.ONE_F_ONE_B:
        return one_f_one_b(p, m)
    if kind is ScheduleKind.INTERLEAVED:
        return interleaved_1f1b(p, m, v)
    return zero_bubble_h1(p, m)


# ---------------------------------------------------------------- lowering


def lower(schedule: Schedule) -> tuple[tuple[Action, ...], ...]:
    """Per rank, the compute actions with the p2p they imply (receive before, send after).

    Forward activations go from stage s to s+1, gradients from s+1 back to s; W moves nothing. For
    every (sender, receiver, op) pair both sides list the transfers in the same order, so FIFO
    matching of isend/irecv pairs them correctly. Run as they stand, sends must not block: under
    interleaving two neighbours can both be sending gradients before either receives (gpipe, 1f1b
    and zb-h1 would survive blocking batches of consecutive transfers; the tests check both), so the
    runtime executes `p2p_plan.comm_plan`'s regrouping of these transfers, which survives NCCL's
    blocking sends. With p = 1 every neighbour is local and nothing is sent.
    """
    p, last = schedule.pp, schedule.pp * schedule.chunks - 1
    if p == 1:
        return tuple(tuple(acts) for acts in schedule.actions)
    lowered = []
    for r, acts in enumerate(schedule.actions):
        out: list[Action] = []
        for a in acts:
            s = virtual_stage(r, a.chunk, p)
            prev, nxt = stage_location(s - 1, p)[0], stage_location(s + 1, p)[0]
            if a.op is Op.FORWARD and s > 0:
                out.append(Action(Op.RECV_F, a.microbatch, a.chunk, prev))
            if a.op.is_backward and s < last:
                out.append(Action(Op.RECV_B, a.microbatch, a.chunk, nxt))
            out.append(a)
            if a.op is Op.FORWARD and s < last:
                out.append(Action(Op.SEND_F, a.microbatch, a.chunk, nxt))
            if a.op.is_backward and s > 0:
                out.append(Action(Op.SEND_B, a.microbatch, a.chunk, prev))
        lowered.append(tuple(out))
    return tuple(lowered)


# ---------------------------------------------------------------- simulation


@dataclass(frozen=True)
class Costs:
    """Time of one microbatch's pass through one rank's share of the model, in arbitrary units.

    An interleaved chunk holds 1/v of that share, so its passes take 1/v of these (§2.2.2).
    `p2p` is the latency of one send->recv hop between ranks.
    """

    forward: float = 1.0
    backward: float = 2.0
    backward_input: float = 1.0
    backward_weight: float = 1.0
    p2p: float = 0.0

    def of(self, op: Op, chunks: int) -> float:
        full = {Op.FORWARD: self.forward, Op.BACKWARD: self.backward,
                Op.BACKWARD_INPUT: self.backward_input, Op.BACKWARD_WEIGHT: self.backward_weight}[op]
        return full / chunks


@dataclass(frozen=True)
class Span:
    rank: int
    start: float
    end: float
    action: Action


@dataclass(frozen=True)
class SimResult:
    schedule: Schedule
    costs: Costs
    makespan: float
    spans: tuple[Span, ...]
    busy: tuple[float, ...]
    peak_in_flight: tuple[int, ...]

    @property
    def bubble_fraction(self) -> float:
        """Idle time over ideal time, t_pb / t_id of §2.2.1; ideal = the busiest rank's compute time."""
        ideal = max(self.busy)
        return (self.makespan - ideal) / ideal if ideal else 0.0


# A finished pass, keyed by (kind, microbatch, virtual stage); B and I share the BACKWARD kind
# because either one releases the gradient the previous stage waits for.
_Key = tuple[Op, int, int]


def _key(op: Op, mb: int, stage: int) -> _Key:
    return (Op.BACKWARD if op.is_backward else op, mb, stage)


def _needs(a: Action, stage: int, last: int) -> list[_Key]:
    """The passes `a` waits for: the neighbour stage's output, and its own earlier pass."""
    mb = a.microbatch
    if a.op is Op.FORWARD:
        return [_key(Op.FORWARD, mb, stage - 1)] if stage > 0 else []
    if a.op is Op.BACKWARD_WEIGHT:
        return [_key(Op.BACKWARD_INPUT, mb, stage)]
    own = [_key(Op.FORWARD, mb, stage)]
    return own if stage == last else own + [_key(Op.BACKWARD, mb, stage + 1)]


def _describe(key: _Key, pp: int) -> str:
    op, mb, stage = key
    rank, chunk = stage_location(stage, pp)
    return f"{Action(op, mb, chunk)} on rank {rank}"


def in_flight(schedule: Schedule) -> tuple[int, ...]:
    """Per rank, the most micro-batch-chunks whose activations it holds at once: the one count the
    simulators, the planner's memory model and the runtime's measured peak are all checked against."""
    return tuple(_in_flight(acts) for acts in schedule.actions)


def _in_flight(acts: tuple[Action, ...]) -> int:
    """Peak count of (microbatch, chunk) whose forward ran and whose activations are still held.

    Activations are freed by B, or by W under the split backward (W still needs the layer inputs).
    """
    split = any(a.op is Op.BACKWARD_WEIGHT for a in acts)
    release = Op.BACKWARD_WEIGHT if split else Op.BACKWARD
    now = peak = 0
    for a in acts:
        now += (a.op is Op.FORWARD) - (a.op is release)
        peak = max(peak, now)
    return peak


def simulate(schedule: Schedule, costs: Costs = Costs()) -> SimResult:
    """Run every rank's list in order, each action as early as its inputs and its rank allow.

    Start times follow from the dependencies alone, so ranks are advanced in any order until none
    can move; actions left over then are a deadlock, reported with what each rank waits for.
    """
    p, v = schedule.pp, schedule.chunks
    last = p * v - 1
    done: dict[_Key, tuple[float, int]] = {}  # finish time and rank
    free, pos = [0.0] * p, [0] * p
    busy, spans = [0.0] * p, []
    progressed = True
    while progressed:
        progressed = False
        for r, acts in enumerate(schedule.actions):
            while pos[r] < len(acts):
                a = acts[pos[r]]
                stage = virtual_stage(r, a.chunk, p)
                needs = _needs(a, stage, last)
                if any(k not in done for k in needs):
                    break
                ready = max((t + (costs.p2p if src != r else 0.0) for t, src in map(done.get, needs)), default=0.0)
                start = max(free[r], ready)
                free[r] = start + costs.of(a.op, v)
                busy[r] += free[r] - start
                done[_key(a.op, a.microbatch, stage)] = (free[r], r)
                spans.append(Span(r, start, free[r], a))
                pos[r] += 1
                progressed = True
    stuck = [r for r in range(p) if pos[r] < len(schedule.actions[r])]
    if stuck:
        raise ScheduleError(f"schedule '{schedule.name}' (pp={p}, microbatches={schedule.microbatches}) deadlocks: "
                            + "; ".join(_blocked(schedule, r, pos[r], done) for r in stuck))
    return SimResult(schedule, costs, max(free), tuple(sorted(spans, key=lambda s: (s.rank, s.start))), tuple(busy),
                     in_flight(schedule))


def _blocked(schedule: Schedule, r: int, i: int, done: dict[_Key, tuple[float, int]]) -> str:
    a, p = schedule.actions[r][i], schedule.pp
    stage = virtual_stage(r, a.chunk, p)
    missing = [_describe(k, p) for k in _needs(a, stage, p * schedule.chunks - 1) if k not in done]
    return f"rank {r} at {a} waits for {' and '.join(missing)}"


def validate(schedule: Schedule) -> SimResult:
    """Check every (microbatch, chunk) has one F and one B (or one I and one W), then simulate.

    The rank that runs an action is the one that owns its virtual stage, by construction of the
    per-rank lists, so completeness per rank is completeness per stage.
    """
    p, m, v = schedule.pp, schedule.microbatches, schedule.chunks
    if len(schedule.actions) != p:
        raise ScheduleError(f"schedule '{schedule.name}' has {len(schedule.actions)} rank lists for pp={p}")
    for r, acts in enumerate(schedule.actions):
        seen: dict[tuple[int, int], list[Op]] = {(mb, c): [] for mb in range(m) for c in range(v)}
        for a in acts:
            if a.op.is_comm or (a.microbatch, a.chunk) not in seen:
                raise ScheduleError(f"schedule '{schedule.name}' rank {r}: unexpected action {a} "
                                    f"(compute only, microbatch < {m}, chunk < {v})")
            seen[(a.microbatch, a.chunk)].append(a.op)
        for (mb, c), ops in seen.items():
            got = sorted(op.value for op in ops)
            if got not in (["B", "F"], ["F", "I", "W"]):
                raise ScheduleError(f"schedule '{schedule.name}' rank {r}: {Action(Op.FORWARD, mb, c)} has passes "
                                    f"{''.join(got) or 'none'}; expected F and B, or F, I and W")
    return simulate(schedule, Costs())
