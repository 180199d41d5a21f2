"""megaloom against plain PyTorch on one GPU, in one process: `python -m bench.gpu`.

Measures, for GPT-2 124M (l12 h768 a12, s1024, micro-batch 32) and GPT 1.3B (l24 h2048 a16, s2048,
micro-batch 8), V = 50,304, bf16 autocast, random tokens:
- the two ceilings of the device: a bf16 8192³ matmul and a device-to-device copy;
- tokens/s, MFU (no-recompute FLOPs of megaloom.perf.flops over 989 TFLOP/s, H100 SXM bf16 dense), peak
  memory and first-step time of the nanoGPT-style reference (bench/reference.py) and of megaloom
  through the Trainer's step path (setup_training + train_step), each eager and with torch.compile;
- the cost of megaloom's parallel machinery at t = p = d = 1: the same model stepped by a bare loop;
- activation recomputation: activation bytes per layer (measured two ways) against Korthikanti et al.,
  step time per mode, and the largest micro-batch that fits for none / selective / full.

Timing follows the device library's METHOD.md: warm-up steps first (compilation stays out), CUDA
events around every step with one synchronisation at the end (no host sync inside the loop), median
over the measured steps. `--device cpu --tiny` runs every section at toy sizes in seconds (used by
tests/unit/test_bench.py); its numbers say nothing about GPUs. `--append bench/RESULTS.md` records the
tables with the command, the device, the torch version and the date.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.activations import per_layer_bytes
from bench.reference import GPTConfig, ReferenceTrainer, plain_step
from megaloom.config import Config, ModelConfig, TrainConfig
from megaloom.model import build_model
from megaloom.model.recompute import set_recompute
from megaloom.parallel.grid import ProcessGrid
from megaloom.perf.flops import hardware_flops_per_token, model_flops_per_token
from megaloom.perf.memory import activation_bytes_per_layer
from megaloom.train.assemble import setup_training
from megaloom.train.optim import build_optimizer
from megaloom.train.step import train_step

PEAK_TFLOPS = 989.0  # H100 SXM bf16 dense, NVIDIA data sheet
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    seq_len: int
    micro_batch: int
    vocab: int = 50304

    def model_config(self) -> ModelConfig:
        return ModelConfig(family="gpt2", layers=self.layers, hidden=self.hidden, heads=self.heads,
                           vocab_size=self.vocab, seq_len=self.seq_len)

    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


SHAPES = {
    "124m": Shape("GPT-2 124M", 12, 768, 12, 1024, 32),
    "1.3b": Shape("GPT 1.3B", 24, 2048, 16, 2048, 8),
}
TINY = {
    "124m": Shape("tiny-a", 2, 64, 4, 64, 4, vocab=256),
    "1.3b": Shape("tiny-b", 2, 128, 4, 128, 2, vocab=256),
}


# ---------------------------------------------------------------- the contenders


class MegaloomRun:
    """megaloom as the Trainer runs it (setup_training: GradSync, optimizer; train_step), or, with
    `wrappers=False`, the same model and optimizer stepped by a bare nanoGPT-style loop."""

    def __init__(self, shape: Shape, device: torch.device, compile: bool, recompute: str = "none", wrappers: bool = True):
        cfg = Config(model=shape.model_config(),
                     train=TrainConfig(precision="bf16", micro_batch=shape.micro_batch, global_batch=shape.micro_batch,
                                       compile=compile, recompute=recompute, device=device.type))
        if wrappers:
            grid = ProcessGrid.from_config(cfg.parallel, cfg.model, rank=0, world_size=1)
            parts = setup_training(cfg, grid, device)
            self.model, self.optimizer, self.sync = parts.model, parts.optimizer, parts.sync
        else:
            self.model = build_model(cfg.model, cfg.train.seed, device)
            self.optimizer, self.sync = build_optimizer(self.model, cfg.train), None
        set_recompute(self.model, recompute)
        self.forward = torch.compile(self.model) if compile else self.model
        self.device, self.wrappers = device, wrappers

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.wrappers:
            return train_step(self.forward, self.optimizer, [(x, y)], precision="bf16", grad_clip=1.0, sync=self.sync).loss
        return plain_step(self.model, self.forward, self.optimizer, x, y, torch.bfloat16)


def reference_run(shape: Shape, device: torch.device, compile: bool) -> ReferenceTrainer:
    return ReferenceTrainer(GPTConfig(shape.layers, shape.hidden, shape.heads, shape.seq_len, shape.vocab), device, compile)


# ---------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class Timing:
    median_ms: float
    spread_ms: float  # max - min over the measured steps
    first_s: float  # the first step, compilation included
    peak_gib: float | None
    loss: float


def time_steps(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: Shape, device: torch.device,
               steps: int, warmup: int) -> Timing:
    """Median step time over `steps` steps after `warmup` (>= 1) steps, fresh random tokens per step
    from a pool of four batches (so no step reads a batch still in cache from the one before)."""
    gen = torch.Generator(device=device).manual_seed(0)
    pool = [torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq_len + 1), device=device, generator=gen)
            for _ in range(4)]
    batches = [(b[:, :-1], b[:, 1:]) for b in pool]
    t0 = time.perf_counter()
    step(*batches[0])
    _sync(device)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        step(*batches[i % 4])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (start, end) in enumerate(events):
            start.record()
            loss = step(*batches[i % 4])
            end.record()
        _sync(device)
        times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated(device) / GIB
    else:
        times = []
        for i in range(steps):
            t = time.perf_counter()
            loss = step(*batches[i % 4])
            times.append((time.perf_counter() - t) * 1e3)
        peak = None
    return Timing(statistics.median(times), max(times) - min(times), first, peak, float(loss))


def _oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)


# ---------------------------------------------------------------- sections


def ceilings(device: torch.device, tiny: bool) -> list[list[str]]:
    """The bf16 matmul rate (8192³) and the copy bandwidth (bytes read + written) of this device."""
    n = 256 if tiny else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    mm_ms = _median_ms(lambda: a @ b, device, reps=5 if tiny else 50)
    nbytes = (1 << 20) if tiny else (1 << 30)
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=device), torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, reps=5 if tiny else 50)
    tflops = 2 * n**3 / mm_ms / 1e9
    return [[f"{str(dtype).removeprefix('torch.')} matmul {n}³", f"{tflops:,.1f} TFLOP/s",
             f"{100 * tflops / PEAK_TFLOPS:.1f}% of {PEAK_TFLOPS:.0f}"],
            ["device-to-device copy", f"{2 * nbytes / copy_ms / 1e6:,.0f} GB/s", "bytes read + written"]]


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _row(label: str, shape: Shape, t: Timing | str, flops_per_token: float) -> dict:
    if isinstance(t, str):
        return {"label": label, "shape": shape.name, "error": t}
    tps = shape.tokens() / (t.median_ms / 1e3)
    return {"label": label, "shape": shape.name, "ms": t.median_ms, "spread": t.spread_ms, "tokens_s": tps,
            "mfu": tps * flops_per_token / (PEAK_TFLOPS * 1e12), "peak_gib": t.peak_gib, "first_s": t.first_s,
            "loss": t.loss}


def _measure(label: str, make: Callable[[], object], shape: Shape, device: torch.device, args, flops: float) -> dict:
    _free(device)
    try:
        run = make()
        t: Timing | str = time_steps(run.step, shape, device, args.steps, args.warmup)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _oom(err):
            raise
        t = "out of memory"
    run = None  # noqa: F841 (release the model before the next contender is built)
    return _row(label, shape, t, flops)


def throughput(shape: Shape, device: torch.device, args) -> list[dict]:
    """Reference and megaloom, eager and compiled; megaloom's bare loop for the wrapper cost."""
    flops = model_flops_per_token(shape.model_config())
    rows = []
    for compile in args.compile:
        tag = "compile" if compile else "eager"
        contenders = {f"reference {tag}": lambda c=compile: reference_run(shape, device, c),
                      f"megaloom {tag}": lambda c=compile: MegaloomRun(shape, device, c),
                      f"megaloom bare loop {tag}": lambda c=compile: MegaloomRun(shape, device, c, wrappers=False)}
        rows += [_measure(label, make, shape, device, args, flops) for label, make in contenders.items()]
    return rows


def recompute_modes(shape: Shape, device: torch.device, args) -> list[dict]:
    """Step time per recomputation mode; MFU counts the no-recompute FLOPs, HFU what the GPU executed."""
    rows = []
    for mode in ("none", "selective", "full"):
        row = _measure(f"megaloom recompute={mode}", lambda m=mode: MegaloomRun(shape, device, args.compile[-1], m),
                       shape, device, args, model_flops_per_token(shape.model_config()))
        if "tokens_s" in row:
            row["hfu"] = row["tokens_s"] * hardware_flops_per_token(shape.model_config(), mode) / (PEAK_TFLOPS * 1e12)
        rows.append(row)
    return rows


def memory_per_layer(shape: Shape, device: torch.device) -> list[dict]:
    """Activation bytes per layer: counted tensor by tensor (bench/activations.py), from the CUDA
    allocator (growth over the forward, minus the bf16 weight copies autocast keeps: 2 bytes per
    matrix element), and Korthikanti et al.'s formula (perf.memory)."""
    s, b, h, a = shape.seq_len, shape.micro_batch, shape.hidden, shape.heads
    x = torch.randint(0, shape.vocab, (b, s + 1), device=device)
    rows = []
    for mode in ("none", "selective", "full"):
        def build(layers: int, mode: str = mode) -> torch.nn.Module:
            cfg = replace(shape, layers=layers).model_config()
            cfg.dropout = 0.1  # the formula counts the dropout masks
            return set_recompute(build_model(cfg, 0, device), mode).train()

        def forward(m: torch.nn.Module) -> torch.Tensor:
            return m(x[:, :-1], x[:, 1:])

        _free(device)
        counted = per_layer_bytes(build, forward, torch.bfloat16)
        alloc = _allocator_per_layer(build, forward, device, weight_bytes=2 * 12 * h * h) if device.type == "cuda" else None
        formula = activation_bytes_per_layer(s, b, h, a, recompute=mode)
        rows.append({"mode": mode, "counted": counted, "allocator": alloc, "formula": formula, "sbh": s * b * h})
    return rows


def _allocator_per_layer(build, forward, device, weight_bytes: float, depths=(2, 4)) -> float:
    grown = []
    for layers in depths:
        model = build(layers)
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(model)
        _sync(device)
        grown.append(torch.cuda.memory_allocated(device) - before)
        loss.backward()
        del model, loss
        _free(device)
    return (grown[1] - grown[0]) / (depths[1] - depths[0]) - weight_bytes


def largest_micro_batch(fits: Callable[[int], bool], start: int, cap: int) -> int:
    """The largest b <= cap with fits(b), assuming fits is monotone: doubling from `start`, then
    bisection. 0 when not even b = 1 fits."""
    lo, hi = 0, None
    b = start
    while b <= cap:
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return lo
    if lo == 0:
        return largest_micro_batch(fits, 1, hi - 1) if start > 1 else 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def capacity(shape: Shape, device: torch.device, args) -> list[dict]:
    """The largest micro-batch that trains (two steps) in this device's memory, per mode."""
    def fits(mode: str, b: int) -> bool:
        _free(device)
        try:
            run = MegaloomRun(replace(shape, micro_batch=b), device, False, mode)
            time_steps(run.step, replace(shape, micro_batch=b), device, steps=1, warmup=1)
            return True
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _oom(err):
                raise
            return False
        finally:
            run = None  # noqa: F841

    return [{"mode": mode, "max_micro_batch": largest_micro_batch(lambda b, m=mode: fits(m, b), shape.micro_batch,
                                                                  args.capacity_cap)}
            for mode in ("none", "selective", "full")]


# ---------------------------------------------------------------- report


def _fmt(v, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def report(results: dict, device_name: str) -> str:
    out = []
    if "ceilings" in results:
        out += ["| ceiling | measured | note |", "|---|---|---|"]
        out += [f"| {' | '.join(r)} |" for r in results["ceilings"]]
        out.append("")
    for shape_name, rows in results.get("throughput", {}).items():
        out += [f"**{shape_name}** ({device_name})", "",
                "| run | ms/step (spread) | tokens/s | MFU | peak GiB | first step s | loss |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['label']} | {r['error']} | | | | | |")
                continue
            out.append(f"| {r['label']} | {r['ms']:.2f} ({r['spread']:.2f}) | {r['tokens_s']:,.0f} | "
                       f"{100 * r['mfu']:.1f}% | {_fmt(r['peak_gib'], '.1f')} | {r['first_s']:.1f} | {r['loss']:.3f} |")
        ok = {r["label"]: r for r in rows if "error" not in r}
        best_ref = min((r["ms"] for k, r in ok.items() if k.startswith("reference")), default=None)
        best_ml = min((r["ms"] for k, r in ok.items() if k.startswith("megaloom ") and "bare" not in k), default=None)
        if best_ref and best_ml:
            out.append(f"\nmegaloom / best reference (tokens/s): **{best_ref / best_ml:.3f}x**")
        for tag in ("eager", "compile"):
            a, b = ok.get(f"megaloom {tag}"), ok.get(f"megaloom bare loop {tag}")
            if a and b:
                out.append(f"wrapper cost at t=p=d=1 ({tag}): Trainer step / bare loop = {a['ms'] / b['ms']:.3f}")
        out.append("")
    for shape_name, rows in results.get("recompute", {}).items():
        out += [f"**{shape_name}, recomputation**", "", "| mode | ms/step | MFU | HFU | peak GiB |", "|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['label']} | {r['error']} | | | |")
            else:
                out.append(f"| {r['label']} | {r['ms']:.2f} | {100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% | "
                           f"{_fmt(r['peak_gib'], '.1f')} |")
        out.append("")
    for shape_name, rows in results.get("memory", {}).items():
        out += [f"**{shape_name}, activation bytes per layer** (units of s·b·h bytes)", "",
                "| mode | counted | allocator | formula | counted / formula |", "|---|---|---|---|---|"]
        for r in rows:
            alloc = None if r["allocator"] is None else r["allocator"] / r["sbh"]
            out.append(f"| {r['mode']} | {r['counted'] / r['sbh']:.2f} | {_fmt(alloc, '.2f')} | "
                       f"{r['formula'] / r['sbh']:.2f} | {r['counted'] / r['formula']:.3f} |")
        out.append("")
    for shape_name, rows in results.get("capacity", {}).items():
        base = rows[0]["max_micro_batch"] or 1
        out += [f"**{shape_name}, largest micro-batch in memory**", "", "| mode | micro-batch | vs none |", "|---|---|---|"]
        out += [f"| {r['mode']} | {r['max_micro_batch']} | {r['max_micro_batch'] / base:.2f}x |" for r in rows]
        out.append("")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cpu")
    p.add_argument("--tiny", action="store_true", help="toy shapes (for a CPU smoke test)")
    p.add_argument("--shapes", default="124m,1.3b", help="comma-separated: 124m, 1.3b")
    p.add_argument("--sections", default="ceilings,throughput,recompute,memory,capacity",
                   help="comma-separated: ceilings, throughput, recompute, memory, capacity")
    p.add_argument("--compile", default="off,on", help="torch.compile settings to run: off, on or off,on")
    p.add_argument("--steps", type=int, default=20, help="measured steps (median)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps (compilation happens in the first)")
    p.add_argument("--capacity-cap", type=int, default=128, help="largest micro-batch the capacity search tries")
    p.add_argument("--append", type=Path, help="append the tables, command, device and date to this markdown file")
    args = p.parse_args(argv)
    args.compile = [{"off": False, "on": True}[c] for c in args.compile.split(",")]
    args.warmup = max(1, args.warmup)
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    shapes = [(TINY if args.tiny else SHAPES)[k] for k in args.shapes.split(",")]
    sections = set(args.sections.split(","))
    results: dict = {}
    if "ceilings" in sections:
        results["ceilings"] = ceilings(device, args.tiny)
    for shape in shapes:
        for section, fn in (("throughput", throughput), ("recompute", recompute_modes), ("capacity", capacity)):
            if section in sections:
                results.setdefault(section, {})[shape.name] = fn(shape, device, args)
        if "memory" in sections:
            results.setdefault("memory", {})[shape.name] = memory_per_layer(shape, device)
    text = report(results, name)
    print(text)
    if args.append:
        command = "python -m bench.gpu " + shlex.join(argv if argv is not None else sys.argv[1:])
        header = (f"\n### {datetime.date.today().isoformat()}, {name}, torch {torch.__version__}\n\n"
                  f"Command: `{command}`\n\n")
        with args.append.open("a", encoding="utf-8") as f:
            f.write(header + text + "\n")
    return text


if __name__ == "__main__":
    main()
