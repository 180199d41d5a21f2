"""Make the tables and pictures of docs/planner.md: `python tools/planner_figures.py` (about a minute).

Prints the validation tables (markdown) and writes docs/img/planner-*.png.
"""

from __future__ import annotations

from pathlib import Path

from megaloom.config import ModelConfig
from megaloom.observe.timeline import draw_timeline
from megaloom.perf.cluster import load_cluster
from megaloom.perf.costs import EAGER, MEGATRON, MEGATRON_2021, Job, Layout
from megaloom.perf.planner import Planner
from megaloom.perf.simulator import simulate_job

IMG = Path(__file__).resolve().parent.parent / "docs" / "img"

# Narayanan et al. 2021, Table 1 (weak scaling, DGX A100, s = 2048, V = 51200, full recomputation):
# parameters (billions), heads, hidden, layers, t, p, GPUs, batch, TFLOP/s per GPU, % of peak.
TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52),
]

# The H100 measurements of 2026-11-24 (bench/RESULTS.md): one H100 SXM, plain PyTorch eager (bf16
# autocast, fused AdamW, SDPA).
MEASURED = [("GPT-2 124M", 12, 768, 12, 32, 1024, 99.5, 30.4), ("GPT 1.3B", 24, 2048, 16, 8, 2048, 309.4, 53.6)]


def table_1() -> None:
    a100 = load_cluster("dgx-a100")
    print("| params (B) | t | p | GPUs | batch | b (planner) | published TFLOP/s | predicted | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for params, a, h, l, t, p, n, batch, tflops, _ in TABLE_1:
        m = ModelConfig(family="gpt2", layers=l, hidden=h, heads=a, vocab_size=51200, seq_len=2048)
        planner = Planner(m, a100, n, batch, MEGATRON_2021)
        fixed = {"tp": t, "pp": p, "recompute": "full", "zero": 0, "chunks": 1, "sequence_parallel": False}
        best = planner.search(fixed, top=1)[0]
        r = best.report()
        got = r["hardware_tflops_per_gpu"]
        print(f"| {params} | {t} | {p} | {n} | {batch} | {r['microbatch']} | {tflops} | {got:.0f} | "
              f"{got / tflops - 1:+.1%} |")


def table_1_free() -> None:
    """The same rows with the search free over micro-batch and chunks, as a user runs `megaloom plan
    --tp T --pp P --zero 0 --recompute full --recipe megatron-2021`."""
    a100 = load_cluster("dgx-a100")
    print("| params (B) | t | p | GPUs | batch | planner's b, v | published TFLOP/s | predicted | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    errors = []
    for params, a, h, l, t, p, n, batch, tflops, _ in TABLE_1:
        m = ModelConfig(family="gpt2", layers=l, hidden=h, heads=a, vocab_size=51200, seq_len=2048)
        best = Planner(m, a100, n, batch, MEGATRON_2021).search({"tp": t, "pp": p, "recompute": "full", "zero": 0},
                                                                top=1)[0]
        r = best.report()
        got = r["hardware_tflops_per_gpu"]
        errors.append(got / tflops - 1)
        print(f"| {params} | {t} | {p} | {n} | {batch} | {r['microbatch']}, {r['chunks']} | {tflops} | {got:.0f} | "
              f"{errors[-1]:+.1%} |")
    print(f"\nmean absolute error {sum(map(abs, errors)) / len(errors):.1%}, worst {max(errors, key=abs):+.1%}")


def measured() -> None:
    h100 = load_cluster("dgx-h100")
    print("| model | b x s | measured ms/step | predicted | error | measured peak GiB | predicted | error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, l, h, a, b, s, ms, gib in MEASURED:
        m = ModelConfig(family="gpt2", layers=l, hidden=h, heads=a, vocab_size=50304, seq_len=s)
        r = simulate_job(Job(m, h100, 1, b, Layout(microbatch=b), EAGER)).report()
        t, g = r["step_time_s"] * 1e3, r["memory_per_gpu_gib"]
        print(f"| {name} | {b} x {s} | {ms} | {t:.1f} | {t / ms - 1:+.1%} | {gib} | {g:.1f} | {g / gib - 1:+.1%} |")


def timelines() -> None:
    m = ModelConfig(family="gpt2", layers=48, hidden=8192, heads=64, vocab_size=51200, seq_len=2048)
    h100 = load_cluster("dgx-h100")
    for v, name in ((1, "1f1b"), (2, "interleaved")):
        sim = simulate_job(Job(m, h100, 32, 8, Layout(8, 4, 1, 1, v, "selective"), MEGATRON))
        title = f"GPT 39B, 32 H100 (t=8, p=4), batch 8, v={v}: step {sim.step_time:.2f} s"
        draw_timeline(sim.schedule_sim, IMG / f"planner-{name}.png", title)
        print(f"{name}: step {sim.step_time:.3f} s, bubble {sim.bubble_fraction:.1%}")


def topologies() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # GPT 175B on 1024 H100 (t=8, p=8, d=16, no ZeRO), batch 512: fp32 gradient all-reduce over 16 nodes per stage
    m = ModelConfig(family="gpt2", layers=96, hidden=12288, heads=96, vocab_size=51200, seq_len=2048)
    names = ["dgx-h100", "h100-rail-optimized", "h100-rail-only", "h100-fat-tree-4to1", "h100-dragonfly", "h100-torus"]
    rows = []
    for name in names:
        for sharp in (False, True):
            if sharp and name == "h100-torus":
                continue
            c = load_cluster(name, **({"sharp": True} if sharp else {}))
            sim = simulate_job(Job(m, c, 1024, 512, Layout(8, 8, 16, 1, 1, "selective", 0, True), MEGATRON))
            rows.append((name, sharp, sim.step_time, sim.breakdown["dp_comm_exposed"]))
    print("| cluster | SHARP | step s | exposed dp comm s |")
    print("|---|---|---|---|")
    for name, sharp, step, dp in rows:
        print(f"| {name} | {'on' if sharp else 'off'} | {step:.3f} | {dp:.3f} |")
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    labels = [f"{n.replace('h100-', '')}{' +SHARP' if s else ''}" for n, s, _, _ in rows]
    ax.bar(range(len(rows)), [r[2] for r in rows], color=["tab:orange" if r[1] else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("predicted step time (s)")
    ax.set_ylim(min(r[2] for r in rows) * 0.95, max(r[2] for r in rows) * 1.02)
    ax.set_title("GPT 175B, 1024 H100, t=8 p=8 d=16, batch 512: step time by network", fontsize=9)
    fig.tight_layout()
    fig.savefig(IMG / "planner-topology.png")
    plt.close(fig)


if __name__ == "__main__":
    IMG.mkdir(parents=True, exist_ok=True)
    measured()
    print()
    table_1()
    print()
    table_1_free()
    print()
    timelines()
    print()
    topologies()
