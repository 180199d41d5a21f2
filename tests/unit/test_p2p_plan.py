"""The runtime's communication plan under NCCL's blocking rule (a grouped send may wait for its receive,
a batch completes only when all its ops are matched), checked by a pure simulator; no processes."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megaloom.parallel.p2p_plan import P2PBatch, comm_plan, lowered_plan, run_blocking
from megaloom.parallel.schedules import (
    Action,
    Op,
    Schedule,
    ScheduleError,
    ScheduleKind,
    build_schedule,
    gpipe,
    interleaved_1f1b,
    lower,
    one_f_one_b,
    zero_bubble_h1,
)


def _cases():
    for p in (2, 3, 4, 8):
        for m in sorted({1, p - 1 or 1, p, p + 1, 2 * p - 1, 2 * p, 3 * p}):
            for kind in ("gpipe", "1f1b", "zb-h1"):
                yield kind, p, m, 1
            for v in (1, 2, 3):
                if v == 1 or m % p == 0:  # interleaved with v > 1 needs m to be a multiple of p
                    yield "interleaved", p, m, v


CASES = list(_cases())


def _check_plan(sched: Schedule) -> None:
    plan = comm_plan(sched)
    run = run_blocking(sched, plan)  # raises on deadlock, on a misread message, on a missing input
    lowered = lower(sched)
    for r in range(sched.pp):
        # the same passes in the same order, and exactly the lowered transfers, regrouped
        assert [s for s in plan[r] if isinstance(s, Action)] == list(sched.actions[r])
        ops = [a for s in plan[r] if isinstance(s, P2PBatch) for a in s.ops]
        assert Counter(ops) == Counter(a for a in lowered[r] if a.op.is_comm)
        assert run.order[r] == plan[r]
        assert run.sends[r] == sum(a.op in (Op.SEND_F, Op.SEND_B) for a in ops)
        for batch in (s for s in plan[r] if isinstance(s, P2PBatch)):
            assert batch.ops  # no empty batches
            peers = Counter((a.peer, a.op in (Op.SEND_F, Op.SEND_B)) for a in batch.ops)
            assert max(peers.values()) == 1  # at most one message per neighbour and direction per batch


@pytest.mark.parametrize("kind,p,m,v", CASES, ids=[f"{k}-p{p}-m{m}-v{v}" for k, p, m, v in CASES])
def test_comm_plan_never_deadlocks_under_blocking_batches(kind, p, m, v):
    _check_plan(build_schedule(kind, p, m, v))


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(list(ScheduleKind)), p=st.integers(1, 6), k=st.integers(1, 4), v=st.integers(1, 4),
       extra=st.integers(0, 5))
def test_comm_plan_random_schedules(kind, p, k, v, extra):
    if kind is ScheduleKind.INTERLEAVED:
        sched = build_schedule(kind, p, p * k, v)
    else:
        sched = build_schedule(kind, p, p * k + extra)
    _check_plan(sched)


def test_forward_only_plan():
    """Validation runs every micro-batch through chunk 0, then chunk 1, ...: planned the same way."""
    p, m, v = 4, 5, 2
    order = tuple(tuple(Action(Op.FORWARD, mb, c) for c in range(v) for mb in range(m)) for _ in range(p))
    sched = Schedule("forward-only", p, m, v, order)
    run_blocking(sched, comm_plan(sched))


# ---------------------------------------------------------------- before / after


def test_old_lowered_lists_deadlock_for_interleaved_p2():
    """The evidence: the runtime's old batches (each run of consecutive transfers of `lower()`) deadlock
    under the blocking rule for interleaved p = 2: both ranks sit in a send-only batch."""
    sched = interleaved_1f1b(2, 4, 2)
    with pytest.raises(ScheduleError, match="deadlocks under blocking p2p batches") as e:
        run_blocking(sched, lowered_plan(sched))
    assert "rank 0 waits in [SEND_B(1,0)->1]" in str(e.value)
    assert "rank 1 waits in [SEND_B(1,1)->0" in str(e.value)
    run_blocking(sched, comm_plan(sched))  # the plan completes


@pytest.mark.parametrize("p,m,v", [(2, 6, 3), (3, 6, 2), (4, 8, 2), (8, 16, 2)])
def test_old_lowered_lists_deadlock_for_interleaved(p, m, v):
    sched = interleaved_1f1b(p, m, v)
    with pytest.raises(ScheduleError, match="deadlocks"):
        run_blocking(sched, lowered_plan(sched))
    run_blocking(sched, comm_plan(sched))


@pytest.mark.parametrize("make", [gpipe, one_f_one_b, zero_bubble_h1])
def test_old_lowered_lists_were_enough_without_interleaving(make):
    for p, m in [(2, 4), (4, 8), (3, 7)]:
        run_blocking(make(p, m), lowered_plan(make(p, m)))


def test_one_f_one_b_pairs_sends_with_receives_like_megatron():
    """Steady state of 1F1B, p = 2: rank 0 sends a forward output and receives a gradient in one batch
    (send_forward_recv_backward), rank 1 sends a gradient and receives the next input in one batch
    (send_backward_recv_forward)."""
    r0, r1 = (list(map(str, steps)) for steps in comm_plan(one_f_one_b(2, 4)))
    assert "[RECV_B(0,1)<-1 SEND_F(0,2)->1]" in r0
    assert "[RECV_F(0,2)<-0 SEND_B(0,1)->0]" in r1
    assert r0[0] == "0F0" and r1[0] == "[RECV_F(0,0)<-0]"


def test_single_rank_plan_has_no_batches():
    sched = interleaved_1f1b(1, 3, 2)
    assert comm_plan(sched) == sched.actions
    run_blocking(sched, comm_plan(sched))


# ---------------------------------------------------------------- the simulator catches bad plans


def _plan_1f1b_p2():
    sched = one_f_one_b(2, 2)
    return sched, [list(steps) for steps in comm_plan(sched)]


def test_simulator_reports_misread_messages():
    """Messages between two ranks match in posting order: swapping two receives misreads both."""
    sched, plan = _plan_1f1b_p2()
    i, j = (k for k, s in enumerate(plan[1]) if isinstance(s, P2PBatch) and s.ops[0].op is Op.RECV_F)
    plan[1][i], plan[1][j] = P2PBatch((Action(Op.RECV_F, 1, 0, 0),)), P2PBatch((Action(Op.RECV_F, 0, 0, 0),))
    with pytest.raises(ScheduleError, match="misread"):
        run_blocking(sched, tuple(map(tuple, plan)))


def test_simulator_reports_missing_inputs_and_early_sends():
    sched, plan = _plan_1f1b_p2()
    with pytest.raises(ScheduleError, match="rank 1 runs 0F0 before receiving its input"):
        run_blocking(sched, (tuple(plan[0]), tuple(s for s in plan[1] if isinstance(s, Action))))
    early = [plan[0][1], plan[0][0]] + plan[0][2:]
    with pytest.raises(ScheduleError, match="rank 0 posts SEND_F"):
        run_blocking(sched, (tuple(early), tuple(plan[1])))

