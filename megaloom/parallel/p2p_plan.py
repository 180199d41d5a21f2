"""NCCL-safe pipeline p2p: the communication plan the runtime executes, and a simulator that proves it.

`schedules.lower()` puts each receive right before the pass that needs it and each send right after
the pass that produced it. Run as they stand (each run of consecutive transfers one
`batch_isend_irecv`), those lists only complete if sends do not block. NCCL gives no such promise: a
grouped send may be held until the peer posts the matching receive, and the group completes only when
all of its ops have. Under that rule the interleaved schedule deadlocks (p = 2: both ranks sit in a
send-only batch, each waiting for the other's receive); `run_blocking(s, lowered_plan(s))` shows it.

`comm_plan()` regroups the same transfers so that no schedule can deadlock under blocking,
batch-synchronous semantics. Every transfer gets a *tick*: the time at which `simulate()` finishes the
pass that produces it. The sender posts it right after that pass; the receiver pre-posts the receive
at the same tick (at its first gap between passes at or after it), so the two ends of a transfer sit
in batches of the same tick, and all of a rank's transfers of one tick form one batch. This is
Megatron-LM's pairing: a rank whose pass ends when its neighbour's does sends its output and receives
the neighbour's in one batch (send_forward_recv_backward, send_backward_recv_forward, and under
interleaving all four directions at once); a receive needed later is posted early, with the send.

Why it cannot deadlock: per rank the batches are in increasing tick order, and the batch of tick t
on every rank holds exactly its ends of the transfers of tick t. Take the smallest tick t with an
unfinished batch: every rank with a tick-t batch has finished all earlier batches, and passes never
wait for anything a finished batch did not deliver, so it reaches and posts its tick-t batch; then
every op of tick t has both ends posted and every tick-t batch completes. Induction on t.

`run_blocking()` is that semantics as a pure simulator (no torch.distributed): each rank blocks on its
current batch; a send and a receive match when both are posted (messages between a pair of ranks
match in posting order, as NCCL and gloo match them, whatever our F/B labels say); a batch completes
when all of its ops have matched; no progress with work left is a deadlock. It also checks that each
matched pair carries the intended message and that every pass has its input when it runs.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from itertools import groupby

from megaloom.parallel.schedules import Action, Op, Schedule, ScheduleError, lower, simulate, stage_location, virtual_stage


@dataclass(frozen=True)
class P2PBatch:
    """One `batch_isend_irecv`: comm actions a rank posts together and that complete together."""

    ops: tuple[Action, ...]

    def __str__(self) -> str:
        return "[" + " ".join(map(str, self.ops)) + "]"


Step = Action | P2PBatch
Plan = tuple[tuple[Step, ...], ...]  # per rank: compute actions and p2p batches, in execution order


def lowered_plan(schedule: Schedule) -> Plan:
    """The old runtime's plan: `lower()`'s lists, each run of consecutive comm actions one batch."""
    plan = []
    for acts in lower(schedule):
        steps: list[Step] = []
        for comm, group in groupby(acts, key=lambda a: a.op.is_comm):
            run = tuple(group)
            steps += [P2PBatch(run)] if comm else list(run)
        plan.append(tuple(steps))
    return tuple(plan)


def _producer(r: int, a: Action, pp: int) -> tuple[int, int, tuple[Op, ...]]:
    """(rank, chunk, ops) of the pass whose output comm action `a` of rank r carries."""
    if a.op in (Op.SEND_F, Op.SEND_B):
        return r, a.chunk, (Op.FORWARD,) if a.op is Op.SEND_F else (Op.BACKWARD, Op.BACKWARD_INPUT)
    stage = virtual_stage(r, a.chunk, pp) + (-1 if a.op is Op.RECV_F else 1)
    rank, chunk = stage_location(stage, pp)
    return rank, chunk, (Op.FORWARD,) if a.op is Op.RECV_F else (Op.BACKWARD, Op.BACKWARD_INPUT)


def comm_plan(schedule: Schedule) -> Plan:
    """Per rank, the schedule's compute actions in order with its transfers grouped into batches
    that cannot deadlock under blocking semantics (module docstring). p = 1: no transfers."""
    p = schedule.pp
    if p == 1:
        return tuple(tuple(acts) for acts in schedule.actions)
    spans = {(s.rank, s.action): s for s in simulate(schedule).spans}
    plan = []
    for r, acts in enumerate(lower(schedule)):
        computes = [a for a in acts if a.op.is_compute]
        starts = [spans[r, a].start for a in computes]
        ticks: dict[float, list[Action]] = {}
        for a in acts:
            if a.op.is_comm:
                rank, chunk, ops = _producer(r, a, p)
                end = next(spans[k].end for op in ops if (k := (rank, Action(op, a.microbatch, chunk))) in spans)
                ticks.setdefault(end, []).append(a)
        # batch of tick t: after the passes that start before t, before those starting at or after it
        slots: dict[int, list[float]] = {}
        for t in sorted(ticks):  # a rank's passes start in list order: count those before t by bisection
            slots.setdefault(bisect_left(starts, t), []).append(t)
        steps: list[Step] = []
        for i in range(len(computes) + 1):
            for t in slots.get(i, []):  # receives first (pre-posted), then the sends
                steps.append(P2PBatch(tuple(sorted(ticks[t], key=lambda a: a.op in (Op.SEND_F, Op.SEND_B)))))
            if i < len(computes):
                steps.append(computes[i])
        plan.append(tuple(steps))
    return tuple(plan)


@dataclass(frozen=True)
class BlockingRun:
    """What `run_blocking` executed: per rank the steps in order, and the p2p counts."""

    order: tuple[tuple[Step, ...], ...]
    batches: tuple[int, ...]
    sends: tuple[int, ...]


_SEND = (Op.SEND_F, Op.SEND_B)


def _pass_key(op: Op) -> str:
    return "F" if op is Op.FORWARD else "W" if op is Op.BACKWARD_WEIGHT else "B"


def run_blocking(schedule: Schedule, plan: Plan) -> BlockingRun:
    """Execute `plan` under blocking, batch-synchronous p2p; raise ScheduleError on a deadlock, on a
    send matched with the wrong receive, or on a pass whose input was not received (module docstring)."""
    p, last = schedule.pp, schedule.pp * schedule.chunks - 1
    pos = [0] * p
    current: list[list[tuple[int, int, int]] | None] = [None] * p  # (src, dst, k) of the batch's ops
    posted: dict[bool, Counter] = {True: Counter(), False: Counter()}  # is_send -> (src, dst) -> count
    ends: dict[tuple[bool, tuple[int, int, int]], tuple[int, Action]] = {}
    have: list[set] = [set() for _ in range(p)]  # (kind, mb, chunk) received or computed on this rank
    order: list[list[Step]] = [[] for _ in range(p)]
    batches, sends = [0] * p, [0] * p
    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            while pos[r] < len(plan[r]):
                step = plan[r][pos[r]]
                if isinstance(step, Action):
                    stage = virtual_stage(r, step.chunk, p)
                    need = ({("RF", step.microbatch, step.chunk)} if step.op is Op.FORWARD and stage > 0 else
                            {("RB", step.microbatch, step.chunk)} if step.op.is_backward and stage < last else set())
                    if p > 1 and not need <= have[r]:  # p = 1: every neighbour stage is local
                        raise ScheduleError(f"rank {r} runs {step} before receiving its input")
                    have[r].add((_pass_key(step.op), step.microbatch, step.chunk))
                elif current[r] is None:  # post the batch
                    keys = []
                    for a in step.ops:
                        send = a.op in _SEND
                        if send and ("F" if a.op is Op.SEND_F else "B", a.microbatch, a.chunk) not in have[r]:
                            raise ScheduleError(f"rank {r} posts {a} before computing it")
                        pair = (r, a.peer) if send else (a.peer, r)
                        keys.append(pair + (posted[send][pair],))
                        posted[send][pair] += 1
                        ends[send, keys[-1]] = (r, a)
                    current[r] = keys
                    progressed = True
                    continue
                else:
                    if not all((True, k) in ends and (False, k) in ends for k in current[r]):
                        break
                    for k in current[r]:
                        _check_pair(ends[True, k], ends[False, k], p)
                    for a in step.ops:
                        if a.op not in _SEND:
                            have[r].add(("R" + a.op.value[-1], a.microbatch, a.chunk))
                    batches[r] += 1
                    sends[r] += sum(a.op in _SEND for a in step.ops)
                    current[r] = None
                order[r].append(step)
                pos[r] += 1
                progressed = True
    stuck = [r for r in range(p) if pos[r] < len(plan[r])]
    if stuck:
        raise ScheduleError(f"schedule '{schedule.name}' (pp={p}, microbatches={schedule.microbatches}, "
                            f"chunks={schedule.chunks}) deadlocks under blocking p2p batches: "
                            + "; ".join(f"rank {r} waits in {plan[r][pos[r]]}" for r in stuck))
    unmatched = [k for (send, k) in ends if (not send, k) not in ends]
    if unmatched:
        raise ScheduleError(f"unmatched p2p ops (src, dst, index): {unmatched}")
    return BlockingRun(tuple(map(tuple, order)), tuple(batches), tuple(sends))


def _check_pair(send: tuple[int, Action], recv: tuple[int, Action], p: int) -> None:
    (rs, s), (rr, v) = send, recv
    step = 1 if s.op is Op.SEND_F else -1
    ok = (v.op is (Op.RECV_F if s.op is Op.SEND_F else Op.RECV_B) and s.microbatch == v.microbatch
          and virtual_stage(rs, s.chunk, p) + step == virtual_stage(rr, v.chunk, p))
    if not ok:
        raise ScheduleError(f"rank {rs}'s {s} is matched with rank {rr}'s {v}: the message would be misread")


__all__ = ["BlockingRun", "P2PBatch", "Plan", "Step", "comm_plan", "lowered_plan", "run_blocking"]
