"""Our schedules against torch.distributed.pipelining's, compared as per-rank compute orders; no processes.

torch builds each schedule's `pipeline_order` (rank -> list of `_Action(stage, type, microbatch)`,
with None for idle steps) in the constructor, from nothing but the stage count, the group size and
the microbatch count. Its own visualiser, `_schedule_visualizer.get_schedule_ops`, does this with
autospec'd `PipelineStage` mocks, which is the least fragile way in: a private module, but one torch
maintains for exactly this use. It refuses multi-stage schedule classes with one stage per rank, so
those (used for the v = 1 comparisons) are built with the same mocks here.
"""

from unittest import mock

import pytest

from megaloom.parallel.schedules import Schedule, gpipe, interleaved_1f1b, one_f_one_b, virtual_stage, zero_bubble_h1

visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
torch_schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
torch_stage = pytest.importorskip("torch.distributed.pipelining.stage")

Order = list[list[tuple[str, int, int]]]  # per rank: (op, microbatch, virtual stage)


def ours(sched: Schedule) -> Order:
    return [[(a.op.value, a.microbatch, virtual_stage(r, a.chunk, sched.pp)) for a in acts]
            for r, acts in enumerate(sched.actions)]


def _compute_only(ranks) -> Order:  # noqa: ANN001 - torch's private action lists
    return [[(a.computation_type.value, a.microbatch_index, a.stage_index) for a in acts
             if a is not None and a.is_compute_op] for acts in ranks]


def torch_order(name: str, p: int, m: int, v: int | None = None) -> Order:
    return _compute_only(visualizer.get_schedule_ops(name, p, m, v))


def torch_single_chunk_multi(cls: type, p: int, m: int) -> Order:
    """A multi-stage schedule class with one stage per rank, built as get_schedule_ops builds its stages."""
    stage = mock.create_autospec(torch_stage.PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod, stage.num_stages = 0, p, None, p
    order = cls([stage], m).pipeline_order
    return _compute_only(order[r] for r in range(p))


@pytest.mark.parametrize("p,m", [(2, 2), (2, 5), (4, 4), (4, 8), (3, 7), (8, 16)])
def test_gpipe_matches_torch(p, m):
    assert ours(gpipe(p, m)) == torch_order("GPipe", p, m)


@pytest.mark.parametrize("p,m", [(2, 2), (2, 5), (4, 4), (4, 8), (3, 7), (8, 16)])
def test_one_f_one_b_matches_torch(p, m):
    """Identical on every rank but the last, where torch 2.13's `Schedule1F1B._get_pipeline_order` is off by one.

    The last rank has no warm-up forwards, and torch's loop increments its forward counter before
    the first steady-state forward, so that rank's IR reads F1 B0 F2 B1 ... Fm B(m-1): F0 is missing
    and a nonexistent Fm appears. (torch's executing code, `Schedule1F1B._step_microbatches`, keeps
    its own counters and is not affected; only the IR used by the visualiser and runtime is.) We
    accept either torch's corrected order or exactly that shifted one. torch also requires m >= p.
    """
    mine, theirs = ours(one_f_one_b(p, m)), torch_order("1F1B", p, m)
    assert mine[:-1] == theirs[:-1]
    shifted = [(op, mb + 1 if op == "F" else mb, stage) for op, mb, stage in mine[-1]]
    assert theirs[-1] in (mine[-1], shifted)


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 6, 3), (4, 4, 2), (4, 8, 2), (4, 16, 3), (3, 6, 4), (8, 8, 2)])
def test_interleaved_matches_torch(p, m, v):
    """Equal: torch follows Megatron-LM's warm-up, 2(p-r-1) + (v-1)·p forwards capped at m·v, and its
    groups of p microbatches per chunk. (torch relaxes m % p == 0, which we do not compare.)"""
    assert ours(interleaved_1f1b(p, m, v)) == torch_order("Interleaved1F1B", p, m, v)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 4), (4, 8), (5, 10), (3, 6)])
def test_interleaved_with_one_chunk_is_1f1b_with_a_deeper_warmup_in_torch(p, m):
    """Documented difference: our interleaved with v = 1 is plain 1F1B (p-r-1 warm-up forwards), while
    torch's Interleaved1F1B applies Megatron's interleaved formula, 2(p-r-1). Both run the forwards
    and the backwards each in microbatch order; only where the backwards start differs."""
    mine = ours(interleaved_1f1b(p, m, 1))
    theirs = torch_single_chunk_multi(torch_schedules.ScheduleInterleaved1F1B, p, m)
    for r in range(p):
        for op in "FB":
            assert [a for a in mine[r] if a[0] == op] == [a for a in theirs[r] if a[0] == op]
        warm = [next(i for i, a in enumerate(order) if a[0] == "B") for order in (mine[r], theirs[r])]
        assert warm == [min(p - r, m), min(2 * (p - r - 1) + 1, m)]  # warm-up forwards, then one more


@pytest.mark.parametrize("p,m", [(1, 3), (2, 4), (4, 1), (4, 2), (4, 3), (4, 4), (4, 8), (3, 6), (5, 10), (8, 16)])
def test_zero_bubble_h1_matches_torch_zb1p_with_one_chunk(p, m):
    """torch's ScheduleInterleavedZeroBubble (ZB1P of Qi et al.) with one chunk per rank is ZB-H1:
    1F1B's warm-up, then F I, with rank r deferring each W by r microbatches."""
    assert ours(zero_bubble_h1(p, m)) == torch_single_chunk_multi(torch_schedules.ScheduleInterleavedZeroBubble, p, m)
