"""Benchmark, run by hand: the planner with a cluster file `megaloom calibrate` wrote on this machine,
against `megaloom train` on the same machine, 2 CPU processes, at (t, p, d) = (2, 1, 1), (1, 2, 1) and
(1, 1, 2) without ZeRO, under ZeRO-2 and under ZeRO-3.

    .venv/bin/python -m bench.calibrated_cpu [--config configs/debug.toml] [--steps 12] [--rounds 3]

Each round runs `torchrun --nproc_per_node 2 -m megaloom calibrate`, then for each layout `megaloom train`
for --steps steps (the median step time of the steps after the first three, from metrics.jsonl's
tokens_per_s; the parameter + gradient + optimizer bytes rank 0 holds) and `megaloom simulate --recipe
megaloom --cluster` that round's calibrated file, and prints both side by side; the last lines give each
layout's median over the rounds of measured, predicted and their ratio. A benchmark, not a test: wall
clock on a shared machine varies, the same training by 30% and more from one minute to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))
# (t, p, d) = (2, 1, 1) and (1, 2, 1), which the planner issue asks for, and d = 2 without ZeRO, ZeRO-2 and ZeRO-3
LAYOUTS = (("t2 p1 d1", ["parallel.tp=2"], ["--tp", "2"]),
           ("t1 p2 d1", ["parallel.pp=2"], ["--pp", "2"]),
           ("d2 z0", ["parallel.dp=2"], []),
           ("d2 z2", ["parallel.dp=2", "parallel.zero=2"], ["--zero", "2"]),
           ("d2 z3", ["parallel.dp=2", "parallel.zero=3"], ["--zero", "3"]))
QUIET = ["--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "log.plot=false"]


def _run(cmd: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/debug.toml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="megaloom-bench-"))
    print(f"{'round':<6} {'layout':<10} {'measured s/step':>16} {'predicted':>10} {'ratio':>6} {'state MiB':>10} "
          f"{'predicted':>10}")
    rows_by_layout: dict[str, list[tuple[float, float]]] = {}
    for k in range(1, args.rounds + 1):
        cluster = work / f"calibrated-{k}.toml"
        _run([TORCHRUN, "--nproc_per_node", "2", "-m", "megaloom", "calibrate", "--out", str(cluster),
              "--config", args.config])
        for name, sets, flags in LAYOUTS:
            measured, predicted, state, state_predicted = _one(args, work / f"{name.replace(' ', '')}-{k}", cluster,
                                                               sets, flags)
            rows_by_layout.setdefault(name, []).append((measured, predicted))
            print(f"{k:<6} {name:<10} {measured:>16.4f} {predicted:>10.4f} {predicted / measured:>6.2f} "
                  f"{state:>10.4f} {state_predicted:>10.4f}", flush=True)
    print(f"cluster files: {work}")
    for name, pairs in rows_by_layout.items():
        m, p = statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)
        ratios = sorted(b / a for a, b in pairs)
        print(f"median {name}: measured {m:.4f} s/step, predicted {p:.4f}, ratio {p / m:.2f} "
              f"(per round {', '.join(f'{r:.2f}' for r in ratios)})")


def _one(args: argparse.Namespace, run: Path, cluster: Path, sets: list[str], flags: list[str]
         ) -> tuple[float, float, float, float]:
    """One layout: measured and predicted seconds per step, state MiB held and predicted."""
    _run([TORCHRUN, "--nproc_per_node", "2", "-m", "megaloom", "train", args.config, "--run-dir", str(run),
          "--set", f"train.steps={args.steps}", "--set", "log.every=1", *QUIET,
          *[x for s in sets for x in ("--set", s)]])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cfg = json.loads(_run([PY, "-m", "megaloom", "info", args.config, "--json"]))
    tokens = next(r["tokens"] for r in rows if r["step"] == 1)  # tokens of one step
    measured = statistics.median(tokens / r["tokens_per_s"] for r in rows[3:])
    mem = rows[-1]["memory"]
    state = (mem["params_gib"] + mem["grads_gib"] + mem["optimizer_gib"]) * 1024
    sim = json.loads(_run([PY, "-m", "megaloom", "simulate", "--config", args.config, "--cluster", str(cluster),
                           "--gpus", "2", *flags, "--microbatch", str(cfg["memory"]["micro_batch"]),
                           "--recipe", "megaloom", "--json"]))
    return measured, sim["step_time_s"], state, sim["memory_state_gib"] * 1024

if __name__ == "__main__":
    main()
