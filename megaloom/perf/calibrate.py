"""`megaloom calibrate`: measure the machine it runs on and write a cluster file the planner then uses.

What the planner would otherwise take from a data sheet and an assumption, measured here:

- GEMMs: the achieved FLOP/s of every GEMM shape the planner times for a model and layouts
  (`--config`, over the tensor-parallel degrees that divide the world), in the compute dtype
  (bf16 on a GPU, fp32 on a CPU, as megaloom trains there); the planner then times a GEMM at the
  rate of the nearest measured shape (`hardware.gemm_seconds`).
- Memory bandwidth: a large device-to-device copy (bytes read + written per second).
- What megaloom's own program spends on a pass beyond its arithmetic (`measure_overheads`): operator
  dispatch, autograd and Python, per layer, embedding and head, forward and backward, and the
  optimizer's step per layer. The same model family and options at a negligible size (two channels
  per head, two tokens), timed at 1 and 4 layers: the difference per layer is one layer's fixed cost,
  the rest the embedding's and the head's. On a CPU this is most of a small model's step; on a GPU it
  is the host time a pass cannot finish under, however small its kernels.
- The memory-bound kernels' rate (`fit_kernel_rate`): megaloom's own layer at the config's real shapes (one
  micro-batch, tp = 1, 1 and 4 layers taking turns), forward + backward, and the rate at which the planner's
  memory-bound kernels make its layer formula last as long. A large copy measures the memory system; small
  kernels (GeLU's tanh, softmax's exp, short elementwise loops, launch-bound kernels on a GPU) stay below it.
- Collectives, when launched on several processes (torchrun): all-reduce, all-gather and a
  point-to-point send over the whole world at sizes from 4 KiB to 4 MiB, each fitted by least
  squares to the alpha-beta model the planner uses (`collectives.py`: ring all-reduce
  2(n-1)·alpha + 2(n-1)/n·S/beta, ring all-gather (n-1)·alpha + (n-1)/n·S/beta, p2p alpha + S/beta);
  the file gets the all-reduce's beta as the node's link (one node of n processes).
- What a collective costs inside a step (`fit_tp_latency`), when the process count divides the heads:
  megaloom's layer with the whole world as one tensor-parallel group, forward + backward, and the latency
  per ring step at which the planner's layer at that tp takes as long; back to back the ranks are already
  in step, inside a step a collective also waits for the later rank. The file's link latency is this one,
  the back-to-back alpha a comment beside it.

Every figure in the file is a mean of timed repetitions after warm-up, with the command, the device and
the date written beside it: a step adds up many operations, so what it takes is the sum of their expected
times, and a heavy-tailed operation's median is well under its mean (gloo's small all-reduce on this
2-core machine: median 0.76 ms, mean 1.52 ms over 1,000 repetitions, `bench/gloo_tail.py`). Nothing is fitted to a planner
row: the two fits are to megaloom's own layer, measured here.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from megaloom.config import Config
from megaloom.layout import vocab_rows
from megaloom.parallel.comm import TPGroup
from megaloom.perf.costs import Job, StageCosts
from megaloom.perf.hardware import OVERHEADS
from megaloom.precision import autocast

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch 2.13's name
SIZES = tuple(4096 * 4**i for i in range(6))  # 4 KiB .. 4 MiB per rank, fp32 elements of 4 bytes


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _mean_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.fmean(_timed(fn, device) for _ in range(repeats))


def planner_gemm_shapes(cfg: Config, tps: list[int]) -> list[tuple[int, int, int]]:
    """(m, n, k) of every GEMM the planner times for one layer, the head, at micro-batch rows b·s,
    for each tp: forward C[m, n] = A[m, k] @ B[k, n], input gradient (n and k swapped), weight gradient
    (k x n from m rows)."""
    from megaloom.perf.costs import _gemms

    m, rows = cfg.model, cfg.train.micro_batch * cfg.model.seq_len
    shapes = set()
    for t in tps:
        for n, k in _gemms(m, t) + [(vocab_rows(m.vocab_size, t), m.hidden)]:
            shapes |= {(rows, n, k), (rows, k, n), (k, n, rows)}
    return sorted(shapes)


def measure_gemms(shapes: list[tuple[int, int, int]], device: torch.device, dtype: torch.dtype,
                  repeats: int = 5) -> list[tuple[int, int, int, float]]:
    """(m, n, k, achieved TFLOP/s) of each shape."""
    out = []
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        seconds = _mean_seconds(lambda a=a, b=b: a @ b, device, repeats)
        out.append((m, n, k, 2.0 * m * n * k / seconds / 1e12))
    return out


def measure_copy(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by a device-to-device copy of `mib` MiB."""
    src = torch.empty(mib * 2**20 // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _mean_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds


OVERHEAD_LAYERS = 4  # the deeper of the two tiny models; the shallower has one layer
# GEMMs in a tiny pass, each also timed by the GEMM table at its real shape: subtracted once here so the
# planner does not count their dispatch twice (forward: qkv, out, up, down; backward: input and weight
# gradient of each; the head: one forward GEMM, two backward)
GEMMS_PER_PASS = {"layer_forward": 4, "layer_backward": 8, "head_forward": 1, "head_backward": 2}


def _time_turns(runs: dict, precision: str, device: torch.device, n: int) -> dict[tuple, float]:
    """Means of forward, backward and optimizer step (`(key, "forward")`, ...) of each entry of `runs`, key ->
    (a callable returning the loss, its optimizer or None), over n rounds after three of warm-up; the entries
    take turns within each round, so a busy host slows them alike."""
    times: dict[tuple, list[float]] = {}
    for _ in range(n + 3):
        for key, (loss, opt) in runs.items():
            box: list[torch.Tensor] = []

            def forward(loss: Callable[[], torch.Tensor] = loss, box: list = box) -> None:
                with autocast(precision, device):
                    box.append(loss())

            times.setdefault((key, "forward"), []).append(_timed(forward, device))
            times.setdefault((key, "backward"), []).append(_timed(lambda box=box: box[0].backward(), device))
            if opt is not None:
                times.setdefault((key, "step"), []).append(_timed(opt.step, device))
                opt.zero_grad(set_to_none=False)
    return {k: statistics.fmean(v[3:]) for k, v in times.items()}


def _tokens(cfg: Config, device: torch.device) -> torch.Tensor:
    """One micro-batch of token ids at the config's shapes (train.micro_batch x seq_len), the same every time."""
    m = cfg.model
    return torch.randint(0, m.vocab_size, (cfg.train.micro_batch, m.seq_len), device=device,
                         generator=torch.Generator(device).manual_seed(0))


def _time_depths(model_cfg, cfg: Config, device: torch.device, x: torch.Tensor, n: int,
                 embedding: bool = False, tp: TPGroup | None = None) -> dict[str, float]:
    """Means of forward, backward and optimizer step (`forward1`, ..., `step4`) of megaloom's model
    `model_cfg` at 1 and OVERHEAD_LAYERS layers on the tokens `x` (and, with `embedding`, of a 1-layer
    model's embedding alone: `embedding_forward`, `embedding_backward`); the depths take turns, so a busy
    host slows them alike, and the first three rounds warm up."""
    from dataclasses import replace

    from megaloom.model import build_model
    from megaloom.train.optim import build_optimizer

    runs: dict = {}
    for k in (1, OVERHEAD_LAYERS):
        mod = build_model(replace(model_cfg, layers=k), cfg.train.seed, device, tp)
        runs[k] = (lambda mod=mod: mod(x, x), build_optimizer(mod, cfg.train))
    if embedding:
        emb = build_model(replace(model_cfg, layers=1), cfg.train.seed, device).embed
        runs["embedding"] = (lambda: emb(x).float().sum(), None)
    means = _time_turns(runs, cfg.train.precision, device, n)
    return {f"embedding_{p}" if key == "embedding" else f"{p}{key}": t for (key, p), t in means.items()}


def measure_overheads(cfg: Config, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds per pass that megaloom's own program spends beyond its arithmetic (see the module
    docstring): OVERHEADS -> seconds, each a mean over timed repetitions, never below 0."""
    from dataclasses import replace

    n = max(20, 10 * repeats)
    tiny = replace(cfg.model, hidden=2 * cfg.model.heads, ffn_hidden=8, vocab_size=8, seq_len=2)
    med = _time_depths(tiny, cfg, device, torch.zeros(1, 2, dtype=torch.long, device=device), n, embedding=True)
    out = {"embedding_forward": med["embedding_forward"], "embedding_backward": med["embedding_backward"]}
    for name, key in (("forward", "layer_forward"), ("backward", "layer_backward"), ("step", "optimizer_layer")):
        out[key] = (med[f"{name}{OVERHEAD_LAYERS}"] - med[f"{name}1"]) / (OVERHEAD_LAYERS - 1)
    out["head_forward"] = med["forward1"] - out["layer_forward"] - out["embedding_forward"]
    out["head_backward"] = med["backward1"] - out["layer_backward"] - out["embedding_backward"]
    out["optimizer_base"] = med["step1"] - out["optimizer_layer"]
    a = torch.zeros(2, 8, device=device)
    gemm = _mean_seconds(lambda: a @ a.T, device, n)
    for key, count in GEMMS_PER_PASS.items():
        out[key] -= count * gemm
    return {k: max(0.0, out[k]) for k in OVERHEADS if k in out}  # the FSDP units': measure_fsdp_overheads


def measure_fsdp_overheads(cfg: Config, device: torch.device, repeats: int) -> dict[str, float]:
    """What one FSDP2 unit of megaloom's ZeRO-2/3 adds to a layer, seconds, the whole world as the data-parallel
    group: `fsdp_unit_forward` (ZeRO-3's forward: the gather and its hooks, as ZeRO-2's), `fsdp_unit_backward`
    (ZeRO-3's: gather again, reduce-scatter), `fsdp_unit_backward_zero2` (reduce-scatter only) and
    `fsdp_optimizer_layer` (the optimizer's step on one layer's sharded parameters). megaloom's model at the
    config's shapes (one micro-batch), built by megaloom's own assembly at ZeRO-0, 2 and 3 on the same grid,
    each at 1 and OVERHEAD_LAYERS layers, all six taking turns, forward, backward (with the reduce-scatter on, as
    the step's last micro-batch) and optimizer step timed; per unit, each depth difference less ZeRO-0's (the
    arithmetic is the same: ZeRO shards the weights, not the work). The figures hold the unit's collectives:
    `calibrate` takes out what the planner's own collective formula gives them (`fsdp_beyond_collectives`), so
    that the planner does not count them twice; what is left is FSDP2's own work at these shapes (hooks,
    copy-in and copy-out, the waits of ranks that arrive apart). Collective: every rank calls it."""
    from dataclasses import replace

    from megaloom.parallel.grid import ProcessGrid
    from megaloom.train.assemble import build_parallel_model
    from megaloom.train.optim import build_optimizer

    world, x = dist.get_world_size(), _tokens(cfg, device)
    runs = {}
    for zero in (0, 2, 3):
        for k in (1, OVERHEAD_LAYERS):
            c = replace(cfg, model=replace(cfg.model, layers=k),
                        parallel=replace(cfg.parallel, tp=1, pp=1, dp=world, zero=zero, chunks=1, layers_per_stage=[],
                                         sequence_parallel=False))
            pm = build_parallel_model(c, ProcessGrid.from_config(c.parallel, c.model), device)
            if pm.fsdp is not None:
                pm.fsdp.gradient_sync(True)  # as the step's last micro-batch: the backward reduce-scatters
            runs[zero, k] = (lambda mod=pm.model: mod(x, x), build_optimizer(pm.model, c.train))
    mean = _time_turns(runs, cfg.train.precision, device, max(20, 10 * repeats))

    def per_unit(zero: int, p: str) -> float:
        deeper = ((mean[(zero, OVERHEAD_LAYERS), p] - mean[(zero, 1), p])
                  - (mean[(0, OVERHEAD_LAYERS), p] - mean[(0, 1), p]))
        return deeper / (OVERHEAD_LAYERS - 1)

    names = ("fsdp_unit_forward", "fsdp_unit_backward", "fsdp_unit_backward_zero2", "fsdp_optimizer_layer")
    worst = torch.tensor([per_unit(3, "forward"), per_unit(3, "backward"), per_unit(2, "backward"),
                          per_unit(3, "step")], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # every unit waits for the slowest rank's collectives
    return dict(zip(names, map(float, worst)))


def measure_layer(cfg: Config, device: torch.device, repeats: int, tp: int = 1) -> float:
    """Seconds of one of megaloom's layers, forward + backward, at the config's own shapes (one micro-batch of
    train.micro_batch x seq_len tokens): the difference between the model at 1 and at OVERHEAD_LAYERS layers,
    per layer; a mean over timed repetitions. tp = 1: the whole layer on each process (`fit_kernel_rate` reads
    it); tp > 1: the whole world as one tensor-parallel group, its all-reduces included (`fit_tp_latency`)."""
    group = TPGroup(None, tp, dist.get_rank()) if tp > 1 else None
    med = _time_depths(cfg.model, cfg, device, _tokens(cfg, device), max(10, 8 * repeats), tp=group)
    per = [(med[f"{p}{OVERHEAD_LAYERS}"] - med[f"{p}1"]) / (OVERHEAD_LAYERS - 1) for p in ("forward", "backward")]
    if tp > 1:  # every rank's share of the layer ends with the same all-reduce: the slowest rank's mean stands
        worst = torch.tensor(sum(per), dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return max(0.0, float(worst))
    return max(0.0, sum(per))


def _planner_layer(cfg: Config, measured: dict, tp: int, kernel_gbps: float | None = None,
                   intra_latency_us: float | None = None) -> float:
    """The planner's seconds for one layer (forward + backward, its tensor-parallel collectives inside) of `cfg` at
    tensor-parallel degree `tp` on the cluster file `measured` makes, with the device's `kernel_gbps` or the
    link's `intra_latency_us` replaced where given."""
    from dataclasses import replace

    cluster = _cluster_of(measured)
    if kernel_gbps is not None:
        cluster = replace(cluster, measured=replace(cluster.device, kernel_gbps=kernel_gbps))
    if intra_latency_us is not None:
        cluster = replace(cluster, intra_latency_us=intra_latency_us)
    layer = StageCosts(_one_micro_batch(cfg, tp=tp, dp=1, zero=0, cluster=cluster)).layer
    return layer.forward + layer.backward  # the tp collectives are inside both


def _cluster_of(measured: dict):  # noqa: ANN202 (megaloom.perf.cluster.Cluster)
    """The Cluster the file `measured` makes, as the planner will read it."""
    from megaloom.perf.cluster import cluster_from_text

    return cluster_from_text(render_cluster(measured, "fit"), "the calibration being written")


def _one_micro_batch(cfg: Config, tp: int, dp: int, zero: int, cluster) -> Job:  # noqa: ANN001
    """The planner's Job of `cfg` at (tp, pp = 1, dp) and ZeRO `zero`, one micro-batch per replica, on `cluster`."""
    from dataclasses import replace

    one = replace(cfg, parallel=replace(cfg.parallel, tp=tp, pp=1, dp=dp, chunks=1, zero=zero, sequence_parallel=False,
                                        layers_per_stage=[]),
                  train=replace(cfg.train, global_batch=cfg.train.micro_batch * dp))
    return Job.from_config(one, cluster, tp * dp)


def _bisect_log(f: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """The x in [lo, hi] where the monotonic f(x) crosses target, bisected on log x."""
    rising = f(hi) > f(lo)
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        if (f(mid) > target) == rising:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            break
    return (lo * hi) ** 0.5


def fit_kernel_rate(cfg: Config, measured: dict) -> float | None:
    """The rate (bytes read + written per second) at which the planner's memory-bound kernels make its layer
    pass (forward + backward, tp = 1, the config's micro-batch, this device's measured GEMMs and fixed costs)
    last the `layer_seconds` megaloom's own layer measured; None where even infinitely fast memory-bound
    kernels leave the planner's layer slower than the measured one (then the copy bandwidth stands).

    A large copy measures the memory system; small kernels on a CPU run their arithmetic (tanh of GeLU, exp of
    softmax) and their loops below it, and on a GPU launch-bound small kernels do the same: this is the rate the
    model's own kernels reach, found by bisection on the planner's own pass formula (`StageCosts.layer`)."""
    fit = {**measured, "world": 1, "links": {}, "kernel_gbps": None, "tp_latency_us": None}
    target = measured["layer_seconds"]
    lo, hi = measured["copy_gbps"] * 1e-4, measured["copy_gbps"] * 1e4
    if target <= 0 or _planner_layer(cfg, fit, 1, kernel_gbps=hi) >= target:
        return None
    return _bisect_log(lambda gbps: _planner_layer(cfg, fit, 1, kernel_gbps=gbps), target, lo, hi)


def fit_tp_latency(cfg: Config, measured: dict) -> float | None:
    """The latency (seconds per ring step) at which the planner's all-reduces make its layer at tp = the world
    (forward + backward + collectives, this device's measured GEMMs, kernel rate and fixed costs) last the
    `tp_layer_seconds` megaloom's own tensor-parallel layer measured; the all-reduce's bandwidth stays the
    sweep's. None where even zero latency leaves the planner's layer slower (then the sweep's alpha stands).

    Back to back, with the ranks already in step, a collective costs its latency and bytes; inside a step it
    also waits for the rank whose compute ran longer, and on a host whose processes share the cores the wake-up
    of a waiting rank is part of it: this is the latency a step pays, found on the planner's own layer formula."""
    tp, target = measured["world"], measured.get("tp_layer_seconds", 0.0)
    fit = {**measured, "tp_latency_us": None}
    if target <= 0 or _planner_layer(cfg, fit, tp, intra_latency_us=0.0) >= target:
        return None
    return _bisect_log(lambda us: _planner_layer(cfg, fit, tp, intra_latency_us=us), target, 1e-3, 1e6) * 1e-6


def fsdp_beyond_collectives(cfg: Config, measured: dict, fsdp: dict) -> dict[str, float]:
    """`measure_fsdp_overheads`' per-unit figures less what the planner's collectives on the file's link give the
    unit (forward: its all-gather; ZeRO-3's backward: all-gather and reduce-scatter; ZeRO-2's: the
    reduce-scatter), the unit, group and dtypes as the simulator takes them; never below 0. The optimizer's
    has no collective in it."""
    from megaloom.perf.collectives import Collective, collective_seconds
    from megaloom.perf.traffic import dp_group

    cluster = _cluster_of(measured)
    job = _one_micro_batch(cfg, tp=1, dp=measured["world"], zero=3, cluster=cluster)
    n, group = StageCosts(job).layer_rank_parameters, dp_group(job, 0)
    grad = 2 if job.grad_reduce_dtype == "bf16" else 4
    gather = collective_seconds(cluster, Collective.ALL_GATHER, n * job.activation_bytes, group)
    scatter = collective_seconds(cluster, Collective.REDUCE_SCATTER, n * grad, group)
    return {"fsdp_unit_forward": max(0.0, fsdp["fsdp_unit_forward"] - gather),
            "fsdp_unit_backward": max(0.0, fsdp["fsdp_unit_backward"] - gather - scatter),
            "fsdp_unit_backward_zero2": max(0.0, fsdp["fsdp_unit_backward_zero2"] - scatter),
            "fsdp_optimizer_layer": max(0.0, fsdp["fsdp_optimizer_layer"])}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of t = a + b·S over (S, t) points; a is kept >= 0."""
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    slope = sum((s - mx) * (t - my) for s, t in points) / sxx
    return max(0.0, my - slope * mx), slope


def measure_collectives(device: torch.device, repeats: int = 5) -> dict[str, dict]:
    """Per operation over the whole world, back to back: the measured (bytes, seconds) points and the alpha
    (s) and beta (bytes/s) of the planner's formula fitted to them. (What a collective costs inside a step,
    where the ranks arrive apart, is `fit_tp_latency`'s.)"""
    n, rank = dist.get_world_size(), dist.get_rank()
    reps = max(30, 6 * repeats)  # a mean of a heavy-tailed time needs more repetitions than a median
    out: dict[str, dict] = {}
    for op in ("all_reduce", "all_gather", "p2p"):
        points = []
        for size in SIZES:
            x = torch.ones(size // 4, device=device)
            if op == "all_reduce":
                fn = lambda x=x: dist.all_reduce(x)  # noqa: E731
            elif op == "all_gather":
                full = torch.empty(x.numel() * n, device=device)
                fn = lambda x=x, full=full: _all_gather(full, x)  # noqa: E731
            else:  # rank 0 -> 1, then back, so both time the same round trip
                def fn(x=x):  # noqa: ANN202
                    if rank == 0:
                        dist.send(x, 1)
                        dist.recv(x, 1)
                    elif rank == 1:
                        dist.recv(x, 0)
                        dist.send(x, 0)
            dist.barrier()
            seconds = torch.tensor(_mean_seconds(fn, device, reps), device=device)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank finishes the collective
            if op == "p2p":
                seconds = seconds / 2  # one way of the round trip
            full_bytes = size * n if op == "all_gather" else size
            points.append((float(full_bytes), float(seconds)))
        a, b = fit_line(points)
        if op == "all_reduce":
            alpha, beta = a / (2 * (n - 1)), 2 * (n - 1) / n / b
        elif op == "all_gather":
            alpha, beta = a / (n - 1), (n - 1) / n / b
        else:
            alpha, beta = a, 1 / b
        out[op] = {"alpha_us": alpha * 1e6, "beta_gbs": beta / 1e9, "points": points}
    return out


def calibrate(out: Path, cfg: Config, command: str, repeats: int = 5) -> dict:
    """Measure this machine (and, when a process group is up, the links between its processes) and
    write a cluster TOML to `out` (on rank 0). Returns what was measured. Collective: every rank calls it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tps = [t for t in (1, 2, 4, 8) if world % t == 0 and cfg.model.heads % t == 0]
    gemms = measure_gemms(planner_gemm_shapes(cfg, tps), device, dtype, repeats)
    copy = measure_copy(device, repeats=repeats)
    overheads = measure_overheads(cfg, device, repeats)
    layer = measure_layer(cfg, device, repeats)
    links = measure_collectives(device, repeats) if world > 1 else {}
    # megaloom's layer with the whole world as one tensor-parallel group, where the heads divide
    tp_layer = measure_layer(cfg, device, repeats, tp=world) if world > 1 and world in tps else 0.0
    fsdp = measure_fsdp_overheads(cfg, device, repeats) if world > 1 else {}
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    memory = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, world))
    measured = {"device": name, "world": world, "dtype": str(dtype).removeprefix("torch."), "gemms": gemms,
                "copy_gbps": copy / 1e9, "overheads": overheads, "host_bound": device.type == "cpu",
                "memory_gib": memory / 2**30, "links": links, "layer_seconds": layer,
                "tp_layer_seconds": tp_layer, "tp_latency_us": None}
    measured["kernel_gbps"] = fit_kernel_rate(cfg, measured)
    latency = fit_tp_latency(cfg, measured) if links else None
    measured["tp_latency_us"] = latency * 1e6 if latency is not None else None
    if fsdp:
        measured["overheads"].update(fsdp_beyond_collectives(cfg, measured, fsdp))
    if rank == 0:
        out.write_text(render_cluster(measured, command), encoding="utf-8")
    return measured


def render_cluster(measured: dict, command: str) -> str:
    """The cluster TOML of a measurement: one node of `world` processes on the measured device."""
    today = datetime.date.today().isoformat()
    links = measured["links"]
    lines = [
        f"# Written by `{command}` on {today}: {measured['device']}, {measured['world']} process(es),",
        f"# {measured['dtype']} GEMMs. Every figure below was measured by that command (means of timed",
        "# repetitions after warm-up); see megaloom/perf/calibrate.py.",
        'gpu = "measured"',
        f"gpus_per_node = {measured['world']}",
        'intra_node = "pcie"',
    ]
    if "all_reduce" in links:
        ar = links["all_reduce"]
        fitted = measured.get("tp_latency_us")
        lines += [f"# all-reduce over {measured['world']} processes back to back, fitted: alpha {ar['alpha_us']:.2f} us, "
                  f"beta {ar['beta_gbs']:.3f} GB/s",
                  f"intra_node_gbs = {ar['beta_gbs']:.6g}",
                  *([f"# megaloom's layer at tp = {measured['world']}, forward + backward: "
                     f"{measured['tp_layer_seconds'] * 1e3:.6g} ms"] if measured.get("tp_layer_seconds") else []),
                  *(["# the latency per ring step that makes the planner's layer at that tp take as long: what a",
                     "# step pays for a collective (calibrate.fit_tp_latency)",
                     f"intra_latency_us = {fitted:.6g}"] if fitted is not None else
                    ["# (no tensor-parallel layer fitted: the back-to-back alpha stands)",
                     f"intra_latency_us = {ar['alpha_us']:.6g}"]),
                  "collective_base_us = 0.0  # the fitted alpha holds the whole latency of the measured world",
                  "intra_efficiency = 1.0  # beta is the achieved bandwidth itself"]
        for op in ("all_gather", "p2p"):
            lines.append(f"# {op}: alpha {links[op]['alpha_us']:.2f} us, beta {links[op]['beta_gbs']:.3f} GB/s")
    best = max(tf for *_, tf in measured["gemms"])
    lines += [
        "",
        "[measured_device]",
        f"name = {_toml_str(measured['device'])}",
        f"peak_tflops = {best:.6g}  # the best measured GEMM rate stands for the peak",
        f"memory_gib = {measured['memory_gib']:.6g}",
        f"copy_gbps = {measured['copy_gbps']:.6g}  # a 256 MiB device-to-device copy, bytes read + written",
        f"# megaloom's layer at the config's shapes, forward + backward: {measured['layer_seconds'] * 1e3:.6g} ms;",
        *(["# the memory-bound kernels' rate that makes the planner's layer take as long (calibrate.fit_kernel_rate)",
           f"kernel_gbps = {measured['kernel_gbps']:.6g}"] if measured.get("kernel_gbps") else
          ["# no kernel rate: the planner's GEMMs and fixed costs alone already take as long (copy_gbps stands)"]),
        f"host_bound = {'true' if measured['host_bound'] else 'false'}  # "
        + ("a CPU: dispatch and arithmetic add up" if measured["host_bound"]
           else "launches run ahead: a pass takes the longer of its kernels and its host time"),
        "# [m, n, k, achieved TFLOP/s] of the GEMM shapes the planner times",
        "gemms = [",
        *(f"  [{m}, {n}, {k}, {tf:.6g}]," for m, n, k, tf in measured["gemms"]),
        "]",
        "",
        "# microseconds megaloom's program spends per pass beyond its arithmetic (dispatch, autograd, Python),",
        "# timed on the same model family at a negligible size (megaloom/perf/calibrate.py measure_overheads)",
        "[measured_device.overheads_us]",
        *(f"{k} = {measured['overheads'][k] * 1e6:.6g}" for k in OVERHEADS if k in measured["overheads"]),
    ]
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
