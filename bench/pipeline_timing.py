"""Benchmark, run by hand (a wall-clock comparison must not be in the default test suite: it failed CI
under load). Synthetic compute: stages that sleep a fixed time per forward and backward; the measured
step time of the runtime (real processes, real p2p) beside the simulated time of the same action lists.

    .venv/bin/python -m bench.pipeline_timing
"""

import time

import torch
import torch.distributed as dist
from torch import nn

from megaloom.parallel.grid import Axis, ProcessGrid
from megaloom.parallel.pipeline import PipelineRunner, StageLink
from megaloom.parallel.schedules import Costs, build_schedule, simulate, virtual_stage
from tests.distributed.launch import run_workers

FWD, BWD = 0.04, 0.08  # seconds: sleep, not busy-wait, so 2 cores can host 4 stages


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, share):
        ctx.share = share
        time.sleep(FWD * share)
        return x * w

    @staticmethod
    def backward(ctx, g):
        time.sleep(BWD * ctx.share)
        return g, g.sum().reshape(1), None


class SleepStage(nn.Module):
    """A model chunk: with v chunks per rank each holds 1/v of the rank's layers (`share`), as in §2.2.2."""

    def __init__(self, first: bool, last: bool, hidden: int, share: float):
        super().__init__()
        self.first, self.last, self.hidden, self.share = first, last, hidden, share
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x, targets=None):
        if self.first:
            x = x.float().unsqueeze(-1).expand(*x.shape, self.hidden)
        y = _Sleep.apply(x, self.w, self.share)
        return y.mean() if self.last else y


def _timing_worker(rank, world, schedule_name, chunks):
    torch.set_num_threads(1)
    m, hidden = 8, 4
    schedule = build_schedule(schedule_name, world, m, chunks)
    grid = ProcessGrid.build(1, world, 1, rank=rank, world_size=world)
    n = world * chunks
    stages = [SleepStage(virtual_stage(rank, c, world) == 0, virtual_stage(rank, c, world) == n - 1, hidden,
                         1 / chunks) for c in range(chunks)]
    runner = PipelineRunner(stages, schedule, StageLink(rank, world, grid.ranks(Axis.PP)), (1, 2, hidden),
                            torch.device("cpu"))
    micro = [(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)) for _ in range(m)]
    runner.forward_backward(micro, "fp32")  # warm-up: first p2p connections
    times = []
    for _ in range(2):
        dist.barrier()
        start = time.perf_counter()
        runner.forward_backward(micro, "fp32")
        dist.barrier()
        times.append(time.perf_counter() - start)
    simulated = simulate(schedule, Costs(forward=FWD, backward=BWD)).makespan
    measured = min(times)
    if rank == 0:
        print(f"{schedule_name:12s} v={chunks}  measured {measured:.3f} s  simulated {simulated:.3f} s  "
              f"ratio {measured / simulated:.3f}", flush=True)


def main() -> None:
    for schedule, chunks in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):  # the sleep stage has no I/W split
        run_workers(_timing_worker, 4, schedule, chunks, timeout=300)


if __name__ == "__main__":
    main()
