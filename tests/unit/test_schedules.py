"""Pipeline schedules as data (Narayanan et al. 2021, §2.2): bubbles, memory, completeness, lowering; no processes."""

from collections import Counter, deque
from itertools import groupby

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megaloom.config import ConfigError
from megaloom.parallel.schedules import (
    Action,
    Costs,
    Op,
    Schedule,
    ScheduleError,
    ScheduleKind,
    build_schedule,
    gpipe,
    interleaved_1f1b,
    lower,
    one_f_one_b,
    simulate,
    stage_location,
    validate,
    virtual_stage,
    zero_bubble_h1,
)

PAPER = Costs(forward=1, backward=2)  # §2.2 assumes t_b = 2·t_f
EQUAL = Costs(forward=1, backward_input=1, backward_weight=1)  # Qi et al.'s T_F = T_B = T_W
PM = [(1, 1), (1, 5), (2, 1), (2, 2), (2, 7), (3, 2), (4, 4), (4, 8), (4, 3), (8, 16), (8, 5), (5, 13)]


# ---------------------------------------------------------------- the data types


def test_action_strings():
    assert str(Action(Op.FORWARD, 3)) == "0F3"
    assert str(Action(Op.BACKWARD_WEIGHT, 2, chunk=1)) == "1W2"
    assert str(Action(Op.SEND_F, 3, 0, peer=2)) == "SEND_F(0,3)->2"
    assert str(Action(Op.RECV_B, 2, 1, peer=0)) == "RECV_B(1,2)<-0"


def test_op_kinds():
    assert {op for op in Op if op.is_compute} == {Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT}
    assert {op for op in Op if op.is_comm} == {Op.SEND_F, Op.RECV_F, Op.SEND_B, Op.RECV_B}


def test_virtual_stages_follow_figure_4():
    # p = 4, v = 2: rank 0 holds stages 0 and 4 (layers 1, 2, 9, 10 in the paper's example)
    assert [virtual_stage(0, c, 4) for c in range(2)] == [0, 4]
    assert [stage_location(s, 4) for s in range(8)] == [(r, c) for c in range(2) for r in range(4)]


# ---------------------------------------------------------------- bubbles


@pytest.mark.parametrize("p,m", PM)
@pytest.mark.parametrize("make", [gpipe, one_f_one_b])
def test_bubble_is_p_minus_1_over_m(make, p, m):
    assert simulate(make(p, m), PAPER).bubble_fraction == pytest.approx((p - 1) / m)


@pytest.mark.parametrize("p,k,v", [(2, 1, 2), (2, 3, 2), (4, 1, 2), (4, 2, 2), (4, 3, 4), (3, 2, 3), (8, 2, 2), (1, 3, 2)])
def test_interleaved_bubble_is_v_times_smaller(p, k, v):
    m = k * p
    sim = simulate(interleaved_1f1b(p, m, v), PAPER)
    assert sim.bubble_fraction == pytest.approx((p - 1) / (m * v))
    assert sim.busy == pytest.approx([m * 3.0] * p)  # a chunk's passes take 1/v of the rank's


@pytest.mark.parametrize("p,m", PM)
def test_zero_bubble_h1_bubble(p, m):
    """ZB-H1 cuts 1F1B's bubble to a third when F = I = W (Qi et al. §3.1), given m >= p.

    With m < p there are too few deferred W's to fill the cool-down; the makespan is then set by one
    microbatch's critical path (F down all p stages, I back up, a last W) plus the rest of the last
    rank's F and I work: 2m + 2p - 1 units, which no schedule at 1F1B's memory can beat.
    """
    sim = simulate(zero_bubble_h1(p, m), EQUAL)
    if m >= p:
        assert sim.bubble_fraction == pytest.approx((p - 1) / (3 * m))
        idle_1f1b = simulate(one_f_one_b(p, m), PAPER).makespan - 3 * m
        assert sim.makespan - 3 * m == pytest.approx(idle_1f1b / 3)
    else:
        assert sim.makespan == pytest.approx(2 * m + 2 * p - 1)
        assert sim.bubble_fraction == pytest.approx((2 * p - 1 - m) / (3 * m))


def test_p2p_latency_costs_gpipe_one_round_trip_and_1f1b_more():
    """GPipe pays the hops down and back once; 1F1B's steady state waits on its neighbours each round."""
    hop = Costs(forward=1, backward=2, p2p=0.5)
    for make in (gpipe, one_f_one_b):
        assert simulate(make(4, 8), hop).busy == simulate(make(4, 8), PAPER).busy
    assert simulate(gpipe(4, 8), hop).makespan == pytest.approx(simulate(gpipe(4, 8), PAPER).makespan + 2 * 3 * 0.5)
    assert simulate(one_f_one_b(4, 8), hop).makespan > simulate(gpipe(4, 8), hop).makespan


# ---------------------------------------------------------------- activations in flight


@pytest.mark.parametrize("p,m", PM)
def test_peak_in_flight(p, m):
    assert simulate(gpipe(p, m)).peak_in_flight == (m,) * p
    assert simulate(one_f_one_b(p, m)).peak_in_flight == tuple(min(p - r, m) for r in range(p))
    zb = simulate(zero_bubble_h1(p, m)).peak_in_flight
    assert max(zb) <= p and zb[0] == min(p, m)  # 1F1B's peak, but W's hold activations longer downstream


@pytest.mark.parametrize("p,k,v", [(2, 1, 2), (4, 1, 2), (4, 2, 3), (3, 3, 4), (8, 1, 2)])
def test_interleaved_peak_in_flight_is_megatrons_warmup_plus_one(p, k, v):
    m = k * p
    peak = simulate(interleaved_1f1b(p, m, v)).peak_in_flight
    assert peak == tuple(min(2 * (p - r - 1) + (v - 1) * p + 1, m * v) for r in range(p))


# ---------------------------------------------------------------- every schedule is valid

kinds = st.sampled_from(list(ScheduleKind))


@st.composite
def schedules(draw) -> Schedule:
    kind, p = draw(kinds), draw(st.integers(1, 8))
    if kind is ScheduleKind.INTERLEAVED:
        v = draw(st.integers(1, 4))
        return build_schedule(kind, p, p * draw(st.integers(1, 4)), v)
    return build_schedule(kind, p, draw(st.integers(1, 20)))


@settings(max_examples=150, deadline=None)
@given(sched=schedules())
def test_every_schedule_validates(sched):
    sim = validate(sched)
    assert sim.makespan >= max(sim.busy)
    assert len(sim.spans) == sum(len(a) for a in sched.actions)


@settings(max_examples=60, deadline=None)
@given(sched=schedules(), f=st.floats(0.1, 3), b=st.floats(0.1, 3), w=st.floats(0.1, 3), hop=st.floats(0, 1))
def test_simulation_respects_dependencies(sched, f, b, w, hop):
    sim = simulate(sched, Costs(forward=f, backward=b, backward_input=b / 2, backward_weight=w, p2p=hop))
    p = sched.pp
    by_rank = [[s for s in sim.spans if s.rank == r] for r in range(p)]
    for spans in by_rank:  # one pass at a time, in list order
        assert [s.action for s in spans] == list(sched.actions[spans[0].rank])
        assert all(a.end <= b.start + 1e-9 for a, b in zip(spans, spans[1:]))
    kind = {Op.FORWARD: "F", Op.BACKWARD: "G", Op.BACKWARD_INPUT: "G", Op.BACKWARD_WEIGHT: "W"}
    span = {(kind[s.action.op], s.action.microbatch, virtual_stage(s.rank, s.action.chunk, p)): s for s in sim.spans}
    for (k, mb, stage), s in span.items():
        needs = {"F": [("F", mb, stage - 1)], "W": [("G", mb, stage)],
                 "G": [("F", mb, stage), ("G", mb, stage + 1)]}[k]
        for need in needs:
            if need in span:  # absent: the first stage's input or the last stage's loss
                gap = hop if span[need].rank != s.rank else 0.0
                assert span[need].end + gap <= s.start + 1e-9


# ---------------------------------------------------------------- lowering to p2p


def test_lower_one_f_one_b_two_ranks():
    r0, r1 = lower(one_f_one_b(2, 2))
    assert list(map(str, r0)) == ["0F0", "SEND_F(0,0)->1", "0F1", "SEND_F(0,1)->1",
                                  "RECV_B(0,0)<-1", "0B0", "RECV_B(0,1)<-1", "0B1"]
    assert list(map(str, r1)) == ["RECV_F(0,0)<-0", "0F0", "0B0", "SEND_B(0,0)->0",
                                  "RECV_F(0,1)<-0", "0F1", "0B1", "SEND_B(0,1)->0"]


def test_lower_interleaved_wraps_from_last_rank_to_first():
    r0, r1 = lower(interleaved_1f1b(2, 2, 2))
    # stage 1 (rank 1, chunk 0) feeds stage 2 (rank 0, chunk 1) and takes its gradient back
    assert Action(Op.SEND_F, 0, 0, peer=0) in r1 and Action(Op.RECV_F, 0, 1, peer=1) in r0
    assert Action(Op.SEND_B, 0, 1, peer=1) in r0 and Action(Op.RECV_B, 0, 0, peer=0) in r1
    assert not any(a.op.is_comm and a.chunk == 0 and a.op in (Op.RECV_F, Op.SEND_B) for a in r0)  # stage 0


def test_lower_zero_bubble_moves_nothing_for_w():
    lowered = lower(zero_bubble_h1(3, 4))
    for acts in lowered:
        for a, b in zip(acts, acts[1:]):
            assert not (a.op is Op.BACKWARD_WEIGHT and b.op is Op.SEND_B)
            assert not (b.op is Op.BACKWARD_WEIGHT and a.op is Op.RECV_B)


def test_lower_single_rank_has_no_comm():
    assert lower(interleaved_1f1b(1, 3, 2)) == interleaved_1f1b(1, 3, 2).actions


def _run_lowered(sched: Schedule) -> None:
    """Interpret the lowered lists with non-blocking sends, blocking receives and FIFO channels.

    Completing proves the p2p is deadlock-free; each receive checks that the message at the head of
    its channel is the one it expects, so sends and receives pair one-to-one and in the same order.
    """
    p = sched.pp
    lowered = lower(sched)
    channels: dict[tuple[int, int, Op], deque[tuple[int, int]]] = {}
    pos, progressed = [0] * p, True
    while progressed:
        progressed = False
        for r in range(p):
            while pos[r] < len(lowered[r]):
                a = lowered[r][pos[r]]
                stage = virtual_stage(r, a.chunk, p)
                if a.op in (Op.SEND_F, Op.SEND_B):
                    kind = Op.RECV_F if a.op is Op.SEND_F else Op.RECV_B
                    channels.setdefault((r, a.peer, kind), deque()).append((a.microbatch, stage))
                elif a.op in (Op.RECV_F, Op.RECV_B):
                    queue = channels.get((a.peer, r, a.op))
                    if not queue:
                        break
                    mb, src_stage = queue.popleft()
                    assert (mb, src_stage) == (a.microbatch, stage - 1 if a.op is Op.RECV_F else stage + 1), (r, a)
                pos[r] += 1
                progressed = True
    assert pos == [len(acts) for acts in lowered], f"lowered p2p deadlocks at {pos}"
    assert not any(channels.values()), "sends nobody receives"


@settings(max_examples=100, deadline=None)
@given(sched=schedules())
def test_lowered_sends_match_receives(sched):
    _run_lowered(sched)
    lowered = lower(sched)
    sends = sorted((r, a.peer, a.op.value[-1], a.microbatch) for r, acts in enumerate(lowered) for a in acts
                   if a.op in (Op.SEND_F, Op.SEND_B))
    recvs = sorted((a.peer, r, a.op.value[-1], a.microbatch) for r, acts in enumerate(lowered) for a in acts
                   if a.op in (Op.RECV_F, Op.RECV_B))
    assert sends == recvs
    assert all(a.peer != r for r, acts in enumerate(lowered) for a in acts if a.op.is_comm)


def _completes_with_blocking_batches(sched: Schedule) -> bool:
    """Each run of consecutive comm actions is one batch (the runtime's batch_isend_irecv) that
    finishes only when every op in it is matched, sends included: NCCL's behaviour, where an
    unmatched send holds up everything queued behind it on the stream."""
    p = sched.pp
    runs = [[list(g) for _, g in groupby(acts, key=lambda a: a.op.is_comm)] for acts in lower(sched)]
    posted: Counter = Counter()  # ((src, dst, "F" | "B"), is_send) -> ops posted so far
    pos, waits, progressed = [0] * p, [None] * p, True
    while progressed:
        progressed = False
        for r in range(p):
            while pos[r] < len(runs[r]):
                if runs[r][pos[r]][0].op.is_comm and waits[r] is None:
                    waits[r] = []
                    for a in runs[r][pos[r]]:
                        send = a.op in (Op.SEND_F, Op.SEND_B)
                        channel = ((r, a.peer) if send else (a.peer, r)) + (a.op.value[-1],)
                        posted[channel, send] += 1
                        waits[r].append(((channel, not send), posted[channel, send]))
                if waits[r] and any(posted[key] < n for key, n in waits[r]):
                    break
                pos[r], waits[r], progressed = pos[r] + 1, None, True
    return pos == [len(r) for r in runs]


@pytest.mark.parametrize("p,m", PM)
def test_blocking_batches_suffice_for_gpipe_1f1b_and_zero_bubble(p, m):
    for make in (gpipe, one_f_one_b, zero_bubble_h1):
        assert _completes_with_blocking_batches(make(p, m)), make.__name__


def test_interleaved_needs_non_blocking_sends():
    """Known limit of lowering each transfer next to its own pass: under interleaving both neighbours
    can sit in a send-only batch waiting for the other's receive (p = 2: ranks 0 and 1 each send
    gradients to the other first). Non-blocking isends would be enough
    (`test_lowered_sends_match_receives`), but NCCL's are not, so the runtime executes
    `p2p_plan.comm_plan`'s batches instead (tests/unit/test_p2p_plan.py)."""
    assert not _completes_with_blocking_batches(interleaved_1f1b(2, 4, 2))
    assert _completes_with_blocking_batches(interleaved_1f1b(2, 4, 1))  # v = 1 is 1F1B


# ---------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("args,needles", [
    (("interleaved", 4, 6, 2), ["microbatches (6)", "multiple of parallel.pp (4)", "train.global_batch",
                                "train.micro_batch", "parallel.dp", "8 microbatches"]),
    (("1f1b", 4, 8, 2), ['parallel.chunks (2) > 1 needs parallel.schedule = "interleaved"', '"1f1b"']),
    (("zb-h1", 2, 4, 3), ['parallel.chunks (3) > 1 needs parallel.schedule = "interleaved"']),
    (("gpipe", 4, 0), ["microbatches (0) must be >= 1", "train.global_batch"]),
    (("1f1b", 0, 4), ["parallel.pp (0) must be >= 1"]),
    (("interleaved", 2, 4, 0), ["parallel.chunks (0) must be >= 1"]),
    (("pipedream", 2, 4), ["parallel.schedule = 'pipedream'", "gpipe, 1f1b, interleaved, zb-h1"]),
])
def test_build_schedule_errors_name_keys_and_values(args, needles):
    with pytest.raises(ConfigError) as e:
        build_schedule(*args)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_build_schedule_dispatch():
    assert build_schedule("gpipe", 3, 5) == gpipe(3, 5)
    assert build_schedule(ScheduleKind.ZB_H1, 3, 5) == zero_bubble_h1(3, 5)
    assert build_schedule("interleaved", 4, 8, 2) == interleaved_1f1b(4, 8, 2)
    # one chunk per rank leaves nothing to interleave: it is 1F1B, and m need not be a multiple of p
    assert build_schedule("interleaved", 4, 6, 1) == one_f_one_b(4, 6)


def test_interleaved_needs_multiple_of_pp_directly():
    with pytest.raises(ScheduleError, match=r"microbatches \(6\).*pp \(4\)"):
        interleaved_1f1b(4, 6, 2)


# ---------------------------------------------------------------- broken schedules


def _broken(ranks: list[list[Action]], m: int = 1) -> Schedule:
    return Schedule("broken", len(ranks), m, 1, tuple(tuple(r) for r in ranks))


F, B = Op.FORWARD, Op.BACKWARD


@pytest.mark.parametrize("ranks,needle", [
    ([[Action(F, 0)], [Action(F, 0), Action(B, 0)]], "rank 0: 0F0 has passes F; expected F and B"),
    ([[Action(F, 0), Action(F, 0), Action(B, 0)]], "0F0 has passes BFF"),
    ([[Action(F, 0), Action(B, 0), Action(Op.BACKWARD_WEIGHT, 0)]], "has passes BFW"),
    ([[Action(F, 0), Action(B, 0), Action(Op.SEND_F, 0, peer=0)]], "unexpected action SEND_F"),
    ([[Action(F, 0), Action(B, 0), Action(F, 1)]], "unexpected action 0F1"),
])
def test_validate_reports_incomplete_schedules(ranks, needle):
    with pytest.raises(ScheduleError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        validate(_broken(ranks))


def test_validate_reports_rank_count():
    with pytest.raises(ScheduleError, match="1 rank lists for pp=2"):
        validate(Schedule("broken", 2, 1, 1, ((Action(F, 0), Action(B, 0)),)))


def test_deadlock_names_each_blocked_rank():
    # rank 1 runs its backward before its forward; rank 0 then waits for that gradient forever
    sched = _broken([[Action(F, 0), Action(B, 0)], [Action(B, 0), Action(F, 0)]])
    with pytest.raises(ScheduleError) as e:
        validate(sched)
    msg = str(e.value)
    assert "\n" not in msg and "deadlocks" in msg
    assert "rank 0 at 0B0 waits for 0B0 on rank 1" in msg
    assert "rank 1 at 0B0 waits for 0F0 on rank 1" in msg
