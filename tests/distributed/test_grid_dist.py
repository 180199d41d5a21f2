"""The process grid on 8 gloo processes: each rank's groups hold the ranks the pure arithmetic says."""

import pytest
import torch
import torch.distributed as dist

from megaloom.parallel.grid import Axis, ProcessGrid, group_ranks
from tests.distributed.launch import run_workers


def _check_grid(rank: int, world_size: int, tp: int, pp: int, dp: int) -> None:
    grid = ProcessGrid.build(tp, pp, dp)
    assert (grid.rank, grid.world_size) == (rank, world_size)
    for axis in Axis:
        ranks = grid.ranks(axis)
        assert ranks in group_ranks(axis, tp, pp, dp) and rank in ranks
        group = grid.group(axis)
        assert dist.get_process_group_ranks(group) == ranks
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=group)
        assert total.item() == sum(ranks), (axis, ranks, total.item())
    stage = tp * dp  # ranks per pipeline stage
    assert grid.next_stage_rank == (rank + stage if rank + stage < world_size else None)
    assert grid.prev_stage_rank == (rank - stage if rank >= stage else None)


def test_grid_groups_on_eight_processes():
    run_workers(_check_grid, 8, 2, 2, 2)


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("worker one failed on purpose")


def test_worker_failure_fails_the_caller_with_its_traceback():
    with pytest.raises(Exception, match="worker one failed on purpose") as info:
        run_workers(_fail_on_rank_one, 2)
    assert "_fail_on_rank_one" in str(info.value)
