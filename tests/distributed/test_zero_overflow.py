"""fp16 with ZeRO-1 (reduce-scattered gradients) and ZeRO-2/3: an overflow in one dp rank's gradient
shard only skips the step on every rank (same skip, same loss scale, parameters unchanged), instead of
the ranks disagreeing and hanging."""

import pytest
import torch

from megaloom.config import load_config
from megaloom.parallel.comm import local
from megaloom.parallel.grid import ProcessGrid
from megaloom.train.assemble import setup_training
from megaloom.train.precision import DynamicLossScaler
from megaloom.train.step import train_step

from .launch import run_workers


def _worker(rank, world, zero):
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.layers=2", "model.hidden=32", "model.heads=4", "model.vocab_size=64",
                             "model.seq_len=16", "train.global_batch=4", "train.micro_batch=1",
                             "data.vocab_size=64", "train.precision='fp16'", f"parallel.dp={world}",
                             f"parallel.zero={zero}"])
    grid = ProcessGrid.build(1, 1, world, rank=rank, world_size=world, model=cfg.model)
    parts = setup_training(cfg, grid, torch.device("cpu"))
    scaler = DynamicLossScaler(init_scale=2.0**8)
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))
    micro = list(zip(x[:, :-1].split(1), x[:, 1:].split(1)))

    def poison(params):  # rank 1 only: an inf in its own shard of one gradient (ZeRO-1: a range it owns)
        if rank == 1:
            next(g for p in params for g in parts.sync.shard_grads(p) if g.numel()).view(-1)[0] = float("inf")

    before = [local(p).detach().clone() for p in parts.model.parameters()]
    r = train_step(parts.model, parts.optimizer, micro, precision="fp16", scaler=scaler, sync=parts.sync,
                   inject=poison)
    assert r.skipped, rank
    assert scaler.scale == 2.0**7
    assert all(torch.equal(local(p).detach(), b) for p, b in zip(parts.model.parameters(), before))
    r = train_step(parts.model, parts.optimizer, micro, precision="fp16", scaler=scaler, sync=parts.sync)
    assert not r.skipped  # and the next step runs on both ranks, in the same collectives


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_overflow_on_one_shard_skips_everywhere(zero):
    run_workers(_worker, 2, zero, timeout=120)  # a hang fails it; generous for a loaded 2-core machine
