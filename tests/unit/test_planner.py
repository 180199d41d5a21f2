"""The planner: speed on the paper's largest job, agreement with the simulator, the paper's takeaways
found on its own, and the validation rows of docs/planner.md."""


import pytest

from megaloom.config import ConfigError, ModelConfig
from megaloom.perf.cluster import load_cluster, make_cluster
from megaloom.perf.costs import EAGER, MEGATRON_2021, Job, Layout
from megaloom.perf.planner import Planner, explain
from megaloom.perf.simulator import simulate_job

GPT_1T = ModelConfig(family="gpt2", layers=128, hidden=25600, heads=160, vocab_size=51200, seq_len=2048)
GPT_175B = ModelConfig(family="gpt2", layers=96, hidden=12288, heads=96, vocab_size=51200, seq_len=2048)
GPT_1B = ModelConfig(family="gpt2", layers=24, hidden=2048, heads=16, vocab_size=51200, seq_len=2048)
A100 = load_cluster("dgx-a100")


def test_one_trillion_parameters_on_3072_gpus():
    """The whole search (no wall-clock assertion in the suite: `megaloom plan` for this job is timed in
    docs/planner.md)."""
    planner = Planner(GPT_1T, A100, 3072, 3072)
    sims = planner.search(top=3)
    assert planner.considered > 500
    best = sims[0].job.layout
    assert best.tp == 8 and best.tp * best.pp * best.dp == 3072
    assert all(s.fits for s in sims)
    assert len(explain(sims)) == 4  # the winner, its step in parts, one line per runner-up


def test_the_papers_1t_row():
    """Table 1, last row: (t, p) = (8, 64), batch 3072, 163 TFLOP/s per GPU counting recomputation (52% of
    312). The prediction is within 10%; docs/planner.md records the figure."""
    job = Job(GPT_1T, A100, 3072, 3072, Layout(8, 64, 6, 1, 1, "full"), MEGATRON_2021)
    r = simulate_job(job).report()
    assert r["hardware_tflops_per_gpu"] == pytest.approx(163, rel=0.10)
    assert r["fits"]


@pytest.mark.parametrize("l,h,a,b,s,ms,gib", [(12, 768, 12, 32, 1024, 99.5, 30.4), (24, 2048, 16, 8, 2048, 309.4, 53.6)])
def test_single_h100_rows_of_measured_md(l, h, a, b, s, ms, gib):
    """MEASURED.md, plain PyTorch eager on one H100: step time and peak memory within 10%."""
    model = ModelConfig(family="gpt2", layers=l, hidden=h, heads=a, vocab_size=50304, seq_len=s)
    r = simulate_job(Job(model, load_cluster("dgx-h100"), 1, b, Layout(microbatch=b), EAGER)).report()
    assert r["step_time_s"] * 1e3 == pytest.approx(ms, rel=0.10)
    assert r["memory_per_gpu_gib"] == pytest.approx(gib, rel=0.10)


@pytest.mark.parametrize("layout", [Layout(1, 4, 2, 2), Layout(2, 4, 1, 1, 2), Layout(1, 1, 8, 4, zero=1),
                                    Layout(4, 2, 1, 1, 4, "full", sequence_parallel=True)])
def test_closed_form_agrees_with_the_simulator(layout):
    planner = Planner(GPT_1B, A100, 8, 64)
    est = planner.estimate(layout)
    sim = simulate_job(planner.job(layout))
    assert est.step_time == pytest.approx(sim.step_time, rel=0.05)
    assert est.memory == pytest.approx(sim.memory_per_gpu, rel=1e-6)


def _node_cluster(gpus_per_node: int):
    return make_cluster({"gpu": "A100-80GB", "gpus_per_node": gpus_per_node, "nics_per_node": gpus_per_node,
                         "intra_node_gbs": 300, "nic_gbps": 200}, f"a100-x{gpus_per_node}")


@pytest.mark.parametrize("gpn", [4, pytest.param(8, marks=pytest.mark.xfail(strict=True, reason=(
    "open (docs/planner.md): without sequence parallelism, which the 2021 program did not have, the model puts "
    "(t, p) = (4, 16) 4.2% ahead of (8, 8) on 8-GPU nodes (it passed at 1% only while the search could use it)")))])
def test_takeaway_1_tensor_parallel_up_to_the_node_then_pipeline(gpn):
    """§3.2 Takeaway #1, for GPT-3 175B on 64 GPUs as one pipeline (d = 1, as the paper's Figure 13)."""
    planner = Planner(GPT_175B, _node_cluster(gpn), 64, 128, MEGATRON_2021)
    best = planner.search({"dp": 1, "zero": 0, "chunks": 1, "recompute": "full"}, top=1)[0]
    by_tp = {}
    for e in planner.estimates:
        by_tp[e.layout.tp] = min(by_tp.get(e.layout.tp, float("inf")), e.step_time)
    assert best.job.layout.tp <= gpn  # never across nodes
    assert by_tp[gpn] <= 1.02 * min(by_tp.values())  # the node size is (within 2% of) the best
    assert by_tp[2 * gpn] > 1.12 * by_tp[gpn]  # one step past the node costs >12%
    if gpn == 4:
        assert best.job.layout.tp == 4


def test_takeaway_interleaving_helps_at_small_batch():
    """§2.2.2 / Figure 12: 175B on 96 GPUs, (t, p) = (8, 12): interleaving wins by more at small batch."""
    gain = {}
    for batch in (96, 768):
        planner = Planner(GPT_175B, A100, 96, batch, MEGATRON_2021)
        fixed = {"tp": 8, "pp": 12, "zero": 0, "recompute": "full", "microbatch": 1}
        best = planner.search(fixed, top=1)[0]
        plain = simulate_job(planner.job(Layout(8, 12, 1, 1, 1, "full")))
        assert best.job.layout.chunks > 1
        gain[batch] = plain.step_time / best.step_time - 1
    assert gain[96] > 2 * gain[768] > 0


def test_takeaway_3_the_best_microbatch_depends_on_the_model():
    """§3.3.3: a shallow model without pipeline takes the largest microbatch that fits; a deep pipeline at
    small batch takes a small one (the bubble (p-1)/m grows with b)."""
    small = Planner(GPT_1B, A100, 8, 512).search({"tp": 1, "pp": 1, "zero": 1, "recompute": "none"}, top=1)[0]
    deep = Planner(GPT_175B, A100, 64, 64, MEGATRON_2021).search(
        {"tp": 8, "pp": 8, "zero": 0, "recompute": "full", "chunks": 1}, top=1)[0]
    assert small.job.layout.microbatch >= 4
    assert deep.job.layout.microbatch <= 2


def test_nothing_fits_is_a_one_line_error():
    with pytest.raises(ConfigError, match="no layout of this model fits"):
        Planner(GPT_1T, A100, 8, 8).search(top=1)


def test_the_2021_program_cannot_do_what_came_later():
    """Sequence parallelism and selective recomputation (Korthikanti et al. 2022) are not searched for
    the megatron-2021 recipe, and its p2p blocks (Megatron-LM waited for every batch)."""
    import dataclasses

    model = ModelConfig(family="gpt2", layers=24, hidden=2048, heads=16, vocab_size=51200, seq_len=2048)
    sims = Planner(model, A100, 64, 512, MEGATRON_2021).search(top=5)
    assert all(not s.job.layout.sequence_parallel and s.job.layout.recompute != "selective" for s in sims)
    lay = Layout(2, 4, 8, 2, 2, "none", 0)
    blocking = simulate_job(Job(model, A100, 64, 512, lay, MEGATRON_2021))
    overlapped = simulate_job(Job(model, A100, 64, 512, lay, dataclasses.replace(MEGATRON_2021, overlap_p2p=True)))
    from megaloom.perf.traffic import p2p_seconds

    c, m = p2p_seconds(blocking.job, 0, 1), blocking.job.microbatches
    # Megatron-LM's program (megatron_plan.py) waits once per forward-backward pair for a batch of up to
    # four concurrent transfers: a middle rank stalls about one transfer m·v times
    assert blocking.step_time - overlapped.step_time > 0.8 * m * lay.chunks * c
