"""Benchmark, run by hand: the spread of a gloo all-reduce's time inside a step-like loop, the figure behind
`megaloom calibrate` taking means rather than medians (megaloom/perf/calibrate.py).

    .venv/bin/torchrun --nproc_per_node 2 -m bench.gloo_tail [--repeats 1000]

Each repetition runs three 256 x 256 GEMMs (a little compute, as a step runs between its collectives) and then
times one all-reduce of 64 KiB; rank 0 prints the percentiles and the mean of those times in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1000)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    x = torch.ones(16384)  # 64 KiB of fp32
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    times = []
    for _ in range(args.repeats):
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        dist.all_reduce(x)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    if dist.get_rank() == 0:
        pct = {p: times[int(p / 100 * (len(times) - 1))] for p in (10, 50, 75, 90, 95, 99, 100)}
        print("ms at percentile " + ", ".join(f"{p}: {t:.3f}" for p, t in pct.items())
              + f"; mean {statistics.fmean(times):.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
