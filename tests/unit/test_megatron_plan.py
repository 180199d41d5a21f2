"""The megatron-2021 program's pipeline (megaloom/perf/megatron_plan.py): Megatron-LM 2021's passes and
blocking p2p batches, written down per rank, and timed by the simulator's blocking walk."""

from collections import Counter
from types import SimpleNamespace

import pytest

from megaloom.config import ModelConfig
from megaloom.parallel.schedules import Costs, ScheduleKind, build_schedule, simulate
from megaloom.perf import simulator
from megaloom.perf.cluster import load_cluster
from megaloom.perf.costs import MEGATRON, MEGATRON_2021
from megaloom.perf.megatron_plan import megatron_plan
from megaloom.perf.planner import Planner

CASES = [(4, 8, 1), (2, 3, 1), (8, 8, 1), (2, 6, 8), (4, 8, 2), (4, 4, 2), (8, 16, 3)]


@pytest.mark.parametrize("p,m,v", CASES)
def test_every_pass_once_and_every_transfer_has_two_ends(p, m, v):
    plan = megatron_plan(p, m, v)
    ends = Counter(t for steps in plan for st in steps if st[0] == "batch" for t in st[1])
    assert ends and set(ends.values()) == {2}  # one send and one receive each
    for r, steps in enumerate(plan):
        for kind in ("F", "B"):
            assert sorted((st[1], st[2]) for st in steps if st[0] == kind) == sorted(
                (mb, c) for mb in range(m) for c in range(v))
        for st in steps:  # a transfer's sender or receiver is this rank, the other end its ring neighbour
            if st[0] == "batch":
                for src, dst, _, _ in st[1]:
                    assert r in (src, dst) and (dst - src) % p in (1, p - 1)
    activations = sum(1 for steps in plan for st in steps if st[0] == "batch" for t in st[1] if t[2] == 0) // 2
    assert activations == m * (p * v - 1)  # every stage boundary once per microbatch


@pytest.mark.parametrize("p,m,v", CASES)
def test_with_free_transfers_the_program_has_the_papers_bubble(p, m, v):
    """Blocking batches cost nothing when transfers are free and passes are alike: the step is the
    schedule's own, (p-1)/(m·v) of bubble (Narayanan et al. 2021 §2.2)."""
    kind = ScheduleKind.INTERLEAVED if v > 1 else ScheduleKind.ONE_F_ONE_B
    job = SimpleNamespace(layout=SimpleNamespace(pp=p, chunks=v, schedule_kind=kind), microbatches=m)
    run = simulator._run_blocking(job, [[1.0 / v, 2.0 / v, 1.0, 1.0]] * (p * v), with_p2p=False)
    assert max(run.finish) == pytest.approx(simulate(build_schedule(kind, p, m, v), Costs()).makespan)
    assert max(run.finish) == pytest.approx(3 * m * (1 + (p - 1) / (m * v)))


def test_the_interleaved_program_needs_whole_groups_of_p_microbatches():
    with pytest.raises(ValueError, match="multiple of p"):
        megatron_plan(4, 6, 2)


def test_the_2021_program_is_searched_without_zero():
    """Megatron-LM 2021 had no ZeRO: its recipe's search keeps zero = 0; today's recipe may shard."""
    m = ModelConfig(family="gpt2", layers=24, hidden=2304, heads=24, vocab_size=51200, seq_len=2048)
    a100 = load_cluster("dgx-a100")
    old = Planner(m, a100, 32, 512, MEGATRON_2021).search(top=3, simulate=0)
    assert old and all(s.job.layout.zero == 0 for s in old)
    new = Planner(m, a100, 32, 512, MEGATRON).search(top=50, simulate=0)
    assert any(s.job.layout.zero > 0 for s in new)
