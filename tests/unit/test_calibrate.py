"""`megaloom calibrate`: what it measures is what the cluster file says and what the planner then uses."""

import dataclasses

import pytest
import torch.distributed as dist

from megaloom.cli import main
from megaloom.config import load_config
from megaloom.perf.calibrate import (
    calibrate,
    fit_kernel_rate,
    fit_line,
    fit_tp_latency,
    fsdp_beyond_collectives,
    planner_gemm_shapes,
    render_cluster,
)
from megaloom.perf.cluster import load_cluster
from megaloom.perf.collectives import Collective, collective_seconds
from megaloom.perf.costs import Job, StageCosts
from megaloom.perf.hardware import OVERHEADS, gemm_seconds
from megaloom.perf.simulator import simulate_job

from ..distributed.launch import run_workers

TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.vocab_size=64", "model.seq_len=16",
        "data.vocab_size=64", "train.micro_batch=2", "train.global_batch=2"]


def test_fit_line_is_least_squares():
    a, b = fit_line([(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)])
    assert (a, b) == pytest.approx((1.0, 2.0))


def test_timings_are_means_not_medians(monkeypatch):
    """A step adds up many operations, so calibrate reports each one's mean time: a heavy-tailed repetition
    counts (timings faked: 1, 1, 1, 1 and 6 ms, mean 2, median 1)."""
    import megaloom.perf.calibrate as cal

    durations = iter([1e-3, 1e-3, 1e-3, 1e-3, 6e-3])
    monkeypatch.setattr(cal, "_timed", lambda fn, device: next(durations))
    assert cal._mean_seconds(lambda: None, None, repeats=5, warmup=0) == pytest.approx(2e-3)


def test_one_process_writes_the_gemms_it_measured(tmp_path, capsys):
    out = tmp_path / "here.toml"
    assert main(["calibrate", "--out", str(out), "--repeats", "1", *sum((["--set", s] for s in TINY), [])]) == 0
    assert "wrote" in capsys.readouterr().out
    c = load_cluster(str(out))
    cfg = load_config(None, TINY)
    assert [g[:3] for g in c.device.measured_gemms] == planner_gemm_shapes(cfg, [1])  # one process: t = 1 only
    for m, n, k, tflops in c.device.measured_gemms:  # the planner times each at its measured rate
        assert gemm_seconds(c.device, m, n, k) == pytest.approx(2 * m * n * k / (tflops * 1e12), rel=1e-5)
    assert c.device.copy_bytes_per_s > 0 and c.gpus_per_node == 1
    # the program's fixed costs per pass, measured, each in the file and read back
    text = out.read_text(encoding="utf-8")
    assert "[measured_device.overheads_us]" in text and "host_bound = true" in text
    fsdp = [k for k in OVERHEADS if k.startswith("fsdp_")]  # measured only on several processes
    assert [k for k, _ in c.device.overheads] == [k for k in OVERHEADS if k not in fsdp] and c.device.host_bound
    assert all(v >= 0 for _, v in c.device.overheads) and sum(v for _, v in c.device.overheads) > 0
    # megaloom's layer at the config's shapes, measured, and the kernel rate fitted to it where there is one (at
    # this tiny size the fixed costs may already account for the whole layer; the fit: the test below)
    assert "# megaloom's layer at the config's shapes" in text
    if c.device.kernel_gbps:
        assert "kernel_gbps =" in text and c.device.copy_bytes_per_s == c.device.kernel_gbps * 1e9
    else:
        assert "no kernel rate" in text and c.device.copy_bytes_per_s == c.device.copy_gbps * 1e9


def _measured(cfg, layer_seconds):
    """A calibration's figures, made up but shaped as `calibrate` returns them: every GEMM at 0.05 TFLOP/s."""
    return {"device": "cpu (test)", "world": 1, "dtype": "float32", "copy_gbps": 20.0, "memory_gib": 8.0,
            "gemms": [(m, n, k, 0.05) for m, n, k in planner_gemm_shapes(cfg, [1])], "host_bound": True,
            "overheads": dict.fromkeys(OVERHEADS, 1e-4), "links": {}, "layer_seconds": layer_seconds}


def test_the_fitted_kernel_rate_gives_the_measured_layer_back():
    """`kernel_gbps` is the memory-bound rate at which the planner's layer (forward + backward, tp = 1, the
    config's micro-batch) takes the layer time megaloom measured; a layer faster than its GEMMs and fixed costs
    alone leaves no rate to fit (None: the copy bandwidth stands)."""
    cfg = load_config(None, TINY)
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch=cfg.train.micro_batch))
    for layer_seconds in (2e-3, 5e-3):
        measured = _measured(cfg, layer_seconds)
        rate = fit_kernel_rate(cfg, measured)
        base = load_cluster("dgx-h100")
        device = dataclasses.replace(base.device, name="measured", bf16_tflops=0.05,  # the best GEMM: the peak
                                     measured_gemms=tuple(measured["gemms"]),
                                     copy_gbps=20.0, overheads=tuple(measured["overheads"].items()),
                                     host_bound=True, kernel_gbps=rate)
        c = StageCosts(Job.from_config(one, dataclasses.replace(base, measured=device), 1))
        assert c.layer.forward + c.layer.backward == pytest.approx(layer_seconds, rel=1e-6)
        assert device.copy_bytes_per_s == rate * 1e9
    assert fit_kernel_rate(cfg, _measured(cfg, 1e-6)) is None


def test_the_fitted_tp_latency_gives_the_measured_tensor_parallel_layer_back(tmp_path):
    """`intra_latency_us` is the ring-step latency at which the planner's layer at tp = the world (forward +
    backward, its all-reduces inside, the file's GEMMs, kernel rate and fixed costs) takes what megaloom's own
    tensor-parallel layer measured; the back-to-back all-reduce's alpha stays a comment. A layer faster than the
    planner's at zero latency leaves nothing to fit: the back-to-back alpha stands."""
    cfg = load_config(None, TINY)
    two = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=2),
                              train=dataclasses.replace(cfg.train, global_batch=cfg.train.micro_batch))
    links = {"all_reduce": {"alpha_us": 50.0, "beta_gbs": 2.0}, "all_gather": {"alpha_us": 60.0, "beta_gbs": 1.0},
             "p2p": {"alpha_us": 40.0, "beta_gbs": 3.0}}
    for tp_layer in (4e-3, 9e-3):
        measured = {**_measured(cfg, 2e-3), "world": 2, "links": links, "tp_layer_seconds": tp_layer}
        measured["gemms"] = [(m, n, k, 0.05) for m, n, k in planner_gemm_shapes(cfg, [1, 2])]
        measured["kernel_gbps"] = fit_kernel_rate(cfg, measured)
        latency = fit_tp_latency(cfg, measured)
        assert latency is not None and latency > 0
        measured["tp_latency_us"] = latency * 1e6
        out = tmp_path / "fit.toml"
        out.write_text(render_cluster(measured, "test"), encoding="utf-8")
        c = load_cluster(str(out))
        assert c.intra_latency_us == pytest.approx(latency * 1e6, rel=1e-5)
        assert "back to back, fitted: alpha 50.00 us" in out.read_text(encoding="utf-8")
        layer = StageCosts(Job.from_config(two, c, 2)).layer
        assert layer.tp_comm > 0 and layer.forward + layer.backward == pytest.approx(tp_layer, rel=1e-5)
    fast = {**_measured(cfg, 2e-3), "world": 2, "links": links, "tp_layer_seconds": 1e-6, "tp_latency_us": None}
    fast["gemms"] = [(m, n, k, 0.05) for m, n, k in planner_gemm_shapes(cfg, [1, 2])]
    assert fit_tp_latency(cfg, fast) is None
    out.write_text(render_cluster(fast, "test"), encoding="utf-8")
    assert load_cluster(str(out)).intra_latency_us == pytest.approx(50.0)


def test_zero2_and_zero3_on_a_host_add_their_gathers_reductions_and_fsdp_units_by_hand(tmp_path):
    """On a host-bound device (a CPU, one process per core) nothing hides behind compute: a ZeRO-3 pass is its
    compute, every unit's all-gather and every unit's measured FSDP2 cost (the layers' and the root's); the
    reduce-scatters follow the backward. On a GPU the same units overlap as `fsdp_pass_seconds` says, a unit's
    host work showing only where it is longer than its layer. calibrate's FSDP figures are what it measured
    less the planner's own collectives for the unit."""
    from megaloom.perf.simulator import _B, _F, finish_step, fsdp_pass_seconds, pass_seconds
    from megaloom.perf.traffic import dp_group

    cfg = load_config(None, [*TINY, "model.layers=3", "parallel.dp=2", "parallel.zero=3", "train.global_batch=4"])
    links = {"all_reduce": {"alpha_us": 50.0, "beta_gbs": 2.0}, "all_gather": {"alpha_us": 60.0, "beta_gbs": 1.0},
             "p2p": {"alpha_us": 40.0, "beta_gbs": 3.0}}
    measured = {**_measured(cfg, 2e-3), "world": 2, "links": links}
    measured["overheads"].update(fsdp_unit_forward=7e-4, fsdp_unit_backward=1.1e-3, fsdp_unit_backward_zero2=9e-4,
                                 fsdp_optimizer_layer=3e-4)
    out = tmp_path / "z3.toml"
    out.write_text(render_cluster(measured, "test"), encoding="utf-8")
    c = load_cluster(str(out))
    job = Job.from_config(cfg, c, 2)
    costs = StageCosts(job)
    layers, unit_params = 3, costs.layer_rank_parameters
    root = costs.stage_parameters(0) - layers * unit_params
    group = dp_group(job, 0)
    gather = collective_seconds(c, Collective.ALL_GATHER, unit_params * 4, group)
    gather_root = collective_seconds(c, Collective.ALL_GATHER, root * 4, group)
    ch = costs.chunk(0)
    assert pass_seconds(job, costs, 0, _F) == pytest.approx(ch.forward + gather_root + 3 * gather + 4 * 7e-4)
    assert pass_seconds(job, costs, 0, _B) == pytest.approx(ch.backward + gather_root + 3 * gather + 4 * 1.1e-3)
    end, exposed, opt = finish_step(job, costs, 0, 1.0, [(0.5, 1.0)])
    assert exposed == pytest.approx(collective_seconds(c, Collective.REDUCE_SCATTER, costs.stage_parameters(0) * 4,
                                                       group))
    state_bytes = costs.rank_parameters(0) / 2 * 30  # fused AdamW's bytes per parameter, half the model per rank
    assert opt == pytest.approx(state_bytes / c.device.copy_bytes_per_s + 1e-4 + 3 * (1e-4 + 3e-4))
    # ZeRO-2: the forward gathers as ZeRO-3's, the backward keeps the gathered weights: its units' cost only
    two = dataclasses.replace(job, layout=dataclasses.replace(job.layout, zero=2))
    two_costs = StageCosts(two)
    assert pass_seconds(two, two_costs, 0, _F) == pytest.approx(two_costs.chunk(0).forward + gather_root + 3 * gather
                                                                + 4 * 7e-4)
    assert pass_seconds(two, two_costs, 0, _B) == pytest.approx(two_costs.chunk(0).backward + 4 * 9e-4)
    gpu = dataclasses.replace(c, measured=dataclasses.replace(c.device, host_bound=False))
    gjob = Job.from_config(cfg, gpu, 2)
    gcosts = StageCosts(gjob)
    per_layer = gcosts.layer.forward
    assert pass_seconds(gjob, gcosts, 0, _F) == pytest.approx(fsdp_pass_seconds(
        3, max(per_layer, 7e-4), gcosts.chunk(0).forward - 3 * per_layer, gather, gather_root))
    # calibrate's figures: the measured unit less the planner's all-gather (and, backward, reduce-scatter) of it,
    # the unit the simulator gathers (one layer, fp32 here: the config's precision and gradient dtype)
    fsdp = {"fsdp_unit_forward": 2e-3, "fsdp_unit_backward": 3e-3, "fsdp_unit_backward_zero2": 2.5e-3,
            "fsdp_optimizer_layer": 4e-4}
    beyond = fsdp_beyond_collectives(cfg, measured, fsdp)
    ag = collective_seconds(c, Collective.ALL_GATHER, unit_params * 4, (0, 1))
    rs = collective_seconds(c, Collective.REDUCE_SCATTER, unit_params * 4, (0, 1))
    assert beyond == pytest.approx({"fsdp_unit_forward": 2e-3 - ag, "fsdp_unit_backward": 3e-3 - ag - rs,
                                    "fsdp_unit_backward_zero2": 2.5e-3 - rs, "fsdp_optimizer_layer": 4e-4})


def _costs(device, cfg):
    cluster = dataclasses.replace(load_cluster("dgx-h100"), measured=device)
    return Job.from_config(cfg, cluster), StageCosts(Job.from_config(cfg, cluster))


def test_the_planner_adds_the_measured_overheads_on_a_host_and_overlaps_them_on_a_gpu():
    """A pass on a host-bound device (a CPU) takes its arithmetic plus its measured fixed cost; on a device
    whose kernels run ahead of the host it takes the longer of the two; the optimizer's fixed cost is one
    base part plus one per layer the rank holds."""
    cfg = load_config(None, TINY + ["model.layers=2"])
    bare = dataclasses.replace(load_cluster("dgx-h100").device, name="measured", measured_gemms=((64, 64, 64, 1e-3),),
                               copy_gbps=10.0)
    over = {"layer_forward": 3e-3, "layer_backward": 5e-3, "embedding_forward": 1e-4, "embedding_backward": 2e-4,
            "head_forward": 7e-4, "head_backward": 9e-4, "optimizer_layer": 4e-4, "optimizer_base": 6e-4}
    host = dataclasses.replace(bare, overheads=tuple(over.items()), host_bound=True)
    gpu = dataclasses.replace(host, host_bound=False)
    (_, b), (_, h), (_, g) = (_costs(d, cfg) for d in (bare, host, gpu))
    assert h.layer.forward == pytest.approx(b.layer.forward + 3e-3, rel=1e-12)
    assert h.layer.backward_input == pytest.approx(b.layer.backward_input + 5e-3, rel=1e-12)
    assert h.layer.backward_weight == b.layer.backward_weight
    assert h.embedding.forward == pytest.approx(b.embedding.forward + 1e-4, rel=1e-12)
    assert h.head.backward_input == pytest.approx(b.head.backward_input + 9e-4, rel=1e-12)
    assert g.layer.forward == pytest.approx(max(b.layer.forward, 3e-3), rel=1e-12)
    assert g.head.forward == pytest.approx(max(b.head.forward, 7e-4), rel=1e-12)
    jobs = [_costs(d, cfg)[0] for d in (bare, host)]
    opt = [simulate_job(j).breakdown["optimizer"] for j in jobs]
    assert opt[1] == pytest.approx(opt[0] + 6e-4 + 2 * 4e-4, rel=1e-9)


def test_bad_overheads_table_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('gpu = "measured"\ngpus_per_node = 1\n[measured_device]\nname = "cpu"\npeak_tflops = 0.1\n'
                   'memory_gib = 8\ncopy_gbps = 10\ngemms = [[64, 64, 64, 0.01]]\n[measured_device.overheads_us]\n'
                   'layer_fwd = 5.0\n', encoding="utf-8")
    with pytest.raises(Exception, match=r"overheads_us\] takes non-negative microseconds for layer_forward"):
        load_cluster(str(bad))


def test_bad_measured_table_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('gpu = "measured"\ngpus_per_node = 1\n', encoding="utf-8")
    with pytest.raises(Exception, match="measured_device"):
        load_cluster(str(bad))
    bad.write_text('gpu = "measured"\ngpus_per_node = 1\n[measured_device]\nname = "cpu"\npeak_tflops = 0.1\n'
                   'memory_gib = 8\ncopy_gbps = 10\nkernel_gbps = -1\ngemms = [[64, 64, 64, 0.01]]\n', encoding="utf-8")
    with pytest.raises(Exception, match="kernel_gbps = -1 must be a non-negative rate"):
        load_cluster(str(bad))


def _links(rank, world, out):
    calibrate(out, load_config(None, TINY), "megaloom calibrate (test)", repeats=2)
    dist.barrier()


def test_two_processes_fit_the_planner_formula(tmp_path):
    """The fitted alpha and beta put into the planner's ring all-reduce formula give back the fitted line
    a + b·S at every measured size: the file holds the measurement in the planner's own terms."""
    out = tmp_path / "two.toml"
    run_workers(_links, 2, out, timeout=120)
    text = out.read_text(encoding="utf-8")
    c = load_cluster(str(out))
    assert c.gpus_per_node == 2 and c.intra_node_gbs > 0 and c.intra_latency_us >= 0 and c.intra_efficiency == 1.0
    assert "all_gather: alpha" in text and "p2p: alpha" in text
    assert "megaloom's layer at tp = 2, forward + backward" in text  # the heads divide over the world
    assert [k for k, _ in c.device.overheads] == list(OVERHEADS)  # with the FSDP units' fixed costs
    alpha, beta = c.intra_latency_us * 1e-6, c.intra_node_gbs * 1e9
    for size in (4096.0, 2**20):
        assert collective_seconds(c, Collective.ALL_REDUCE, size, (0, 1)) == pytest.approx(
            2 * alpha + size / beta, rel=1e-4)
