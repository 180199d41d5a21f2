"""What the pipeline runtime does is what the simulator times: on real processes with real p2p, each
rank runs exactly its lowered list's compute actions in order, and sends exactly the list's transfers
(counts and bytes). No wall-clock assertion: the step-time comparison is `bench/pipeline_timing.py`."""

import pytest
import torch
from torch import nn

from megaloom.parallel.grid import Axis, ProcessGrid
from megaloom.parallel.pipeline import PipelineRunner, StageLink
from megaloom.parallel.schedules import Op, build_schedule, lower, virtual_stage

from .launch import run_workers

HIDDEN, M = 4, 8


class Stage(nn.Module):
    def __init__(self, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.w = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x, targets=None):
        if self.first:
            x = x.float().unsqueeze(-1).expand(*x.shape, HIDDEN)
        y = x * self.w
        return y.mean() if self.last else y


def _worker(rank, world, schedule_name, chunks):
    torch.set_num_threads(1)
    schedule = build_schedule(schedule_name, world, M, chunks)
    grid = ProcessGrid.build(1, world, 1, rank=rank, world_size=world)
    n = world * chunks
    stages = [Stage(virtual_stage(rank, c, world) == 0, virtual_stage(rank, c, world) == n - 1) for c in range(chunks)]
    runner = PipelineRunner(stages, schedule, StageLink(rank, world, grid.ranks(Axis.PP)), (1, 2, HIDDEN),
                            torch.device("cpu"))
    ran = []
    forward, backward = runner._forward, runner._backward
    runner._forward = lambda a, *rest: ran.append(a) or forward(a, *rest)
    runner._backward = lambda a, st: ran.append(a) or backward(a, st)
    micro = [(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)) for _ in range(M)]
    runner.forward_backward(micro, "fp32")
    planned = lower(schedule)[rank]
    assert ran == [a for a in planned if not a.op.is_comm]
    sends = sum(1 for a in planned if a.op in (Op.SEND_F, Op.SEND_B))
    assert runner.stats.sent_bytes == sends * 1 * 2 * HIDDEN * 4  # (b, s, h) fp32 per transfer


@pytest.mark.parametrize("schedule, chunks", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)])
def test_runtime_runs_the_planned_actions(schedule, chunks):
    run_workers(_worker, 4, schedule, chunks, timeout=120)
