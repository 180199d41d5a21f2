"""Model math of the planner against hand-computed values from Narayanan et al. 2021 (reference/004) and
Korthikanti et al. 2022; the simulator's pipeline against the paper's bubble formulas."""

import pytest

from megaloom.config import ConfigError, ModelConfig
from megaloom.parallel.grid import Axis, group_of
from megaloom.parallel.schedules import Costs, ScheduleKind, build_schedule, simulate
from megaloom.perf import flops, memory
from megaloom.perf.cluster import load_cluster
from megaloom.perf.costs import EAGER, MEGALOOM, MEGATRON, MEGATRON_2021, Job, Layout, StageCosts, check_job, peak_in_flight
from megaloom.perf.simulator import hardware_flops_per_token, simulate_job
from megaloom.perf.traffic import communication_by_stage, dp_group

GPT_1T = ModelConfig(family="gpt2", layers=128, hidden=25600, heads=160, vocab_size=51200, seq_len=2048)
SMALL = ModelConfig(family="gpt2", layers=16, hidden=1024, heads=16, vocab_size=32000, seq_len=1024)


def job(model=SMALL, gpus=8, batch=64, cluster="dgx-a100", recipe=MEGATRON, **lay):
    t, p = lay.get("tp", 1), lay.get("pp", 1)
    return Job(model, load_cluster(cluster), gpus, batch, Layout(dp=gpus // (t * p), **lay), recipe)


def test_parameters_of_the_1t_model():
    # Table 1 of the paper: 1008.0 billion parameters for (l, h) = (128, 25600), V = 51200, s = 2048
    assert flops.paper_parameters(128, 25600, 51200, 2048) / 1e9 == pytest.approx(1008.0, abs=0.05)
    # megaloom's exact count adds the final LayerNorm (2h)
    assert flops.parameters(GPT_1T) == round(flops.paper_parameters(128, 25600, 51200, 2048)) + 2 * 25600


def test_flops_per_iteration_of_the_1t_row():
    # 163 TFLOP/s per GPU on 3072 GPUs at batch 3072 (counting recomputation, §5.1) means one iteration of
    # 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) FLOPs takes that many seconds:
    f = flops.paper_flops_per_iteration(3072, 2048, 128, 25600, 51200, recompute=True)
    hand = 96 * 3072 * 2048 * 128 * 25600**2 * (1 + 2048 / (6 * 25600) + 51200 / (16 * 128 * 25600))
    assert f == pytest.approx(hand)
    assert f / (163e12 * 3072) == pytest.approx(102.6, abs=0.1)  # seconds per iteration, implied by the paper
    # megaloom's per-token counts reproduce both forms
    tokens = 3072 * 2048
    j = job(GPT_1T, 3072, 3072, tp=8, pp=64, recompute="full")
    assert hardware_flops_per_token(j) * tokens == pytest.approx(f, rel=1e-3)
    assert flops.model_flops_per_token(GPT_1T) * tokens == pytest.approx(
        flops.paper_flops_per_iteration(3072, 2048, 128, 25600, 51200), rel=1e-3)


def test_selective_recompute_adds_the_attention_core_forward():
    j = job(recompute="selective")
    s, h, l = SMALL.seq_len, SMALL.hidden, SMALL.layers
    assert hardware_flops_per_token(j) - flops.model_flops_per_token(SMALL) == 4 * s * h * l


@pytest.mark.parametrize("t,sp,mode", [(1, False, "none"), (8, False, "none"), (8, True, "none"),
                                       (4, False, "selective"), (8, True, "full"), (2, False, "full")])
def test_activation_memory_is_korthikanti(t, sp, mode):
    """The recipe's per-layer bytes equal memory.activation_bytes_per_layer, s·b·h·(10 + 24/t + 5as/(ht)) etc."""
    j = job(gpus=8, tp=t, microbatch=2, recompute=mode, sequence_parallel=sp, recipe=MEGATRON_2021)
    s, b, h, a = SMALL.seq_len, 2, SMALL.hidden, SMALL.heads
    assert StageCosts(j).activation_bytes_per_layer() == pytest.approx(
        memory.activation_bytes_per_layer(s, b, h, a, t, sp, mode))
    if t == 1 and mode == "none":  # the paper's s·b·h·(34 + 5·a·s/h), by hand
        assert StageCosts(j).activation_bytes_per_layer() == s * b * h * (34 + 5 * a * s / h)


def test_flash_attention_keeps_no_scores():
    j = job(tp=2, microbatch=2)
    s, b, h = SMALL.seq_len, 2, SMALL.hidden
    assert StageCosts(j).activation_bytes_per_layer() == s * b * h * (10 + 24 / 2)


def test_state_bytes_per_zero_stage():
    assert [memory.state_bytes_per_parameter(z, 8) for z in range(4)] == [16, 4 + 12 / 8, 2 + 14 / 8, 2]


@pytest.mark.parametrize("kind,p,m,v", [("1f1b", 4, 8, 1), ("1f1b", 8, 3, 1), ("interleaved", 4, 8, 2),
                                        ("interleaved", 4, 12, 3), ("gpipe", 4, 6, 1), ("zb-h1", 4, 8, 1)])
def test_peak_in_flight_matches_the_schedules(kind, p, m, v):
    sim = simulate(build_schedule(kind, p, m, v), Costs())
    for r in range(p):
        assert peak_in_flight(ScheduleKind(kind), p, m, v, r) == sim.peak_in_flight[r]


def test_dp_group_is_the_grid_group():
    j = job(gpus=64, batch=64, tp=2, pp=4)
    for pp_rank in range(4):
        first = dp_group(j, pp_rank)[0]
        assert list(dp_group(j, pp_rank)) == group_of(first, Axis.DP, 2, 4, 8)


@pytest.mark.parametrize("p,m,v", [(4, 16, 1), (8, 32, 1), (4, 16, 2), (4, 16, 4)])
def test_simulated_bubble_is_the_papers(p, m, v):
    """Uniform stages, no head/embedding cost difference: bubble (p-1)/m, interleaved (p-1)/(m·v) (§2.2)."""
    model = ModelConfig(family="gpt2", layers=32, hidden=2048, heads=16, vocab_size=256, seq_len=1024)
    sim = simulate_job(job(model, gpus=p, batch=m, pp=p, chunks=v))
    assert sim.bubble_fraction == pytest.approx((p - 1) / (m * v), rel=0.12)


def test_communication_volumes_by_hand():
    """A middle stage of GPT 1T at (t, p) = (8, 64): §3.2's tensor-parallel bytes plus the scatter/gather
    all-gather of each tensor it receives; §4.1's b·s·h/t each way; the norm's scalars."""
    j = job(GPT_1T, 3072, 3072, tp=8, pp=64, recompute="none")
    vol = communication_by_stage(j, StageCosts(j))[1]
    b, s, h, t, p, layers, m = 1, 2048, 25600, 8, 64, 128 // 64, 3072 // 6
    bsh, ring = b * s * h, (t - 1) / t
    layer_bytes = 8 * bsh * ring * 2 * layers * m  # §3.2, in bf16 bytes
    gathers = 2 * m * ring * bsh * 2  # every received activation and gradient rebuilt over tp
    assert vol["tp"] == pytest.approx(layer_bytes + gathers + 2 * ring * 4)
    assert vol["pp"] == pytest.approx(2 * bsh / t * 2 * m + 2 * (p - 1) / p * 4)  # §4.1 scatter/gather
    jv = job(GPT_1T, 3072, 3072, tp=8, pp=64, chunks=2)
    vv = communication_by_stage(jv, StageCosts(jv))[1]
    assert vv["pp"] - 2 * (p - 1) / p * 4 == pytest.approx(2 * (vol["pp"] - 2 * (p - 1) / p * 4))  # v times (§2.2.2)


def test_megaloom_state_bytes_per_zero_stage():
    """fp32 weights trained under autocast: 4 + 4 + 8 bytes; ZeRO-1 shards Adam's 8 only, ZeRO-2/3 all."""
    assert [memory.state_bytes_per_parameter(z, 8, fp32_weights=True) for z in range(4)] == [16, 9, 2, 2]


@pytest.mark.parametrize("flags,match", [
    (dict(gpus=12, tp=8), "--gpus \\(12\\) must be a multiple of --tp x --pp"),
    (dict(tp=3, gpus=9), "--tp \\(3\\) must divide --heads \\(16\\); try --tp=2"),
    (dict(pp=3, gpus=6), "--layers \\(16\\) is not divisible by --pp x --chunks \\(3\\)"),
    (dict(microbatch=3), "--global-batch \\(64\\) must be a multiple of --microbatch \\(3\\) x dp \\(8\\)"),
    (dict(pp=4, chunks=2, batch=24, microbatch=2), "multiple of --pp \\(4\\)"),
    (dict(pp=1, chunks=2, schedule="1f1b"), '--chunks \\(2\\) > 1 needs --schedule = "interleaved"'),
    (dict(tp=2, gpus=8, sequence_parallel=True), None),  # accepted, as by the runtime
    (dict(pp=2, zero=2), None),
])
def test_bad_layouts_name_the_flag(flags, match):
    gpus, batch = flags.pop("gpus", 8), flags.pop("batch", 64)
    t, p = flags.get("tp", 1), flags.get("pp", 1)
    lay = Layout(dp=max(1, gpus // (t * p)), **flags)
    if match is None:
        check_job(SMALL, gpus, batch, lay)
        return
    with pytest.raises(ConfigError, match=match):
        check_job(SMALL, gpus, batch, lay)


def test_fsdp_pass_by_hand():
    """Two streams, one layer of prefetch: a comm-bound pass is its gathers plus one layer's compute,
    a compute-bound one its compute plus the root's and the first layer's gathers."""
    from megaloom.perf.simulator import fsdp_pass_seconds

    # gathers 3 s a layer, compute 1 s: root gather 2, then 4 gathers back to back, the last layer after
    assert fsdp_pass_seconds(4, 1.0, 0.5, 3.0, 2.0) == pytest.approx(2 + 4 * 3 + 1)
    # compute 5 s a layer, gathers 1 s: only the root's and the first layer's gathers are exposed
    assert fsdp_pass_seconds(4, 5.0, 0.5, 1.0, 2.0) == pytest.approx(2 + 1 + 4 * 5)


def test_zero3_on_a_slow_network_is_communication_bound():
    """GPT-3 175B at d = 1536 over 10 Gb/s NICs: every layer's gather (3.6 GB of bf16 weights) takes
    far longer than its compute, so forward and backward each take at least the sum of the gathers."""
    from megaloom.perf.collectives import Collective, collective_seconds

    gpt3 = ModelConfig(family="gpt2", layers=96, hidden=12288, heads=96, vocab_size=51200, seq_len=2048)
    slow = load_cluster("dgx-a100", nic_gbps=10.0)
    j = Job(gpt3, slow, 1536, 1536, Layout(1, 1, 1536, 1, 1, "full", 3), MEGATRON_2021)
    costs = StageCosts(j)
    gather = collective_seconds(slow, Collective.ALL_GATHER, costs.layer_rank_parameters * 2, dp_group(j, 0))
    sim = simulate_job(j)
    assert gather > 3 * costs.layer.backward
    assert sim.step_time >= 2 * 96 * gather
    assert sim.step_time > 1.5 * 96 * (costs.layer.forward + costs.layer.backward)


def test_megatron_2021_all_reduces_its_gradients_after_the_backward():
    """Megatron-LM of 2021 all-reduced the whole fp32 gradient buffer once forward_backward_func had
    returned (no overlap with the backward): the exposed dp time is that one all-reduce, by hand; the
    megatron recipe overlaps it bucket by bucket and exposes less."""
    from megaloom.perf.collectives import Collective, collective_seconds

    m = ModelConfig(family="gpt2", layers=24, hidden=2304, heads=24, vocab_size=51200, seq_len=2048)
    a100 = load_cluster("dgx-a100")
    lay = Layout(1, 1, 32, 16, 1, "full", 0)
    old, new = (simulate_job(Job(m, a100, 32, 512, lay, recipe)) for recipe in (MEGATRON_2021, MEGATRON))
    params = StageCosts(Job(m, a100, 32, 512, lay, MEGATRON_2021)).rank_parameters(0)
    by_hand = collective_seconds(a100, Collective.ALL_REDUCE, params * 4, tuple(range(32)))
    assert old.report()["time_breakdown_s"]["dp_comm_exposed"] == pytest.approx(by_hand)
    assert new.report()["time_breakdown_s"]["dp_comm_exposed"] < 0.5 * by_hand


def test_megaloom_head_pays_its_gradients_in_the_forward():
    """megaloom's chunked head (megaloom/model/loss.py) computes dL/dh and dL/dW in its forward: the planner's
    forward of that head is the plain head's forward and backward together, its backward only reads and writes
    the two stored fp32 gradients, and nothing of it waits for a weight-gradient pass."""
    model = ModelConfig(family="gpt2", layers=4, hidden=1024, heads=16, vocab_size=50304, seq_len=1024)
    h100 = load_cluster("dgx-h100")
    plain, ours = (StageCosts(Job(model, h100, 1, 8, Layout(microbatch=8), r)).head for r in (EAGER, MEGALOOM))
    assert ours.forward == pytest.approx(plain.forward + plain.backward_input + plain.backward_weight, rel=1e-12)
    tokens = 8 * 1024
    assert ours.backward_input == pytest.approx(8 * (tokens + 50304) * 1024 / h100.device.copy_bytes_per_s, rel=1e-12)
    assert ours.backward_weight == 0.0
