"""The assembly layer: several models on one grid, frozen parameters kept out of the optimizer, the
gradient buffer and the norm, and a partly frozen parallel run equal to the same run on one process."""

import torch
import torch.distributed as dist

from megaloom.config import load_config
from megaloom.model import build_model
from megaloom.parallel.data import optimizer_state_bytes
from megaloom.parallel.grid import ProcessGrid
from megaloom.train.assemble import build_parallel_model, setup_training
from megaloom.train.optim import build_optimizer
from megaloom.train.step import train_step

from .launch import run_workers

STEPS = 4
FROZEN = ("embed.tok.weight", "layers.0.")  # the embedding and the first block: a partly frozen model


def _cfg(tp=1, dp=1, zero=0):
    return load_config(None, ["model.layers=2", "model.hidden=32", "model.heads=4", "model.vocab_size=64",
                              "model.seq_len=16", "train.global_batch=4", "train.micro_batch=1", "train.lr=0.003",
                              "train.grad_clip=0.5", "data.vocab_size=64", f"parallel.tp={tp}", f"parallel.dp={dp}",
                              f"parallel.zero={zero}"])


def _batch(step, dp_rank=0, dp=1):
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(step))
    x = x[dp_rank * len(x) // dp:(dp_rank + 1) * len(x) // dp]
    return list(zip(x[:, :-1].split(1), x[:, 1:].split(1)))


def _freeze(model):
    for name, p in model.named_parameters():
        if name.startswith(FROZEN):
            p.requires_grad_(False)


def _worker(rank, world, tp, dp, zero):
    torch.set_num_threads(1)
    ref = build_model(_cfg().model, _cfg().train.seed)
    _freeze(ref)
    opt = build_optimizer(ref, _cfg().train)
    ref_out = [train_step(ref, opt, _batch(s), grad_clip=0.5) for s in range(STEPS)]

    cfg = _cfg(tp, dp, zero)
    grid = ProcessGrid.build(tp, 1, dp, rank=rank, world_size=world, model=cfg.model)
    policy = build_parallel_model(cfg, grid, torch.device("cpu"))
    frozen = build_parallel_model(cfg, grid, torch.device("cpu"), trainable=False)  # a reference model, same grid
    _freeze(policy.model)
    start = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    parts = setup_training(cfg, grid, torch.device("cpu"), model=policy)
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    if parts.dp_buffer is not None:  # the gradient buffer holds the trainable parameters only
        assert parts.dp_buffer.data.numel() == sum(p.numel() for p in trainable)
    for s in range(STEPS):
        r = train_step(parts.model, parts.optimizer, _batch(s, grid.dp_rank, dp), grad_clip=0.5, sync=parts.sync)
        loss = r.loss.clone()
        dist.all_reduce(loss, group=grid.dp_group)
        torch.testing.assert_close(loss / dp, ref_out[s].loss, rtol=1e-5, atol=1e-5, msg=f"step {s}")
        torch.testing.assert_close(r.grad_norm, ref_out[s].grad_norm, rtol=1e-5, atol=1e-6)
    full_state = 2 * 4 * sum(p.numel() for p in trainable)  # Adam's two fp32 moments, trainable only
    held = optimizer_state_bytes(parts.optimizer)
    assert abs(held - full_state / (dp if zero else 1)) <= 64 * dp, (held, full_state)
    for name, p in policy.model.named_parameters():
        if name.startswith(FROZEN):
            assert torch.equal(p.detach(), start[name]), name  # frozen: untouched, no gradient
            assert p.grad is None, name
    assert not any(p.requires_grad for p in frozen.model.parameters())
    assert all(p.grad is None for p in frozen.model.parameters())
    x = _batch(0, grid.dp_rank, dp)[0][0]
    with torch.no_grad():  # the frozen copy is the untrained model of the same seed
        fresh = build_model(cfg.model, cfg.train.seed)
        ref_logits = fresh(x)
        torch.testing.assert_close(_full_logits(frozen.model(x), grid), ref_logits, rtol=1e-5, atol=1e-5)


def _full_logits(logits, grid):
    if grid.tp == 1 or logits.shape[-1] == 64:  # already the full vocabulary
        return logits
    parts = [torch.empty_like(logits) for _ in range(grid.tp)]
    dist.all_gather(parts, logits.contiguous(), group=grid.tp_group)
    return torch.cat(parts, dim=-1)


def test_two_models_one_grid_frozen_parameters_tp2_dp2_zero1():
    run_workers(_worker, 4, 2, 2, 1, timeout=120)


def test_frozen_parameters_dp2_zero0():
    run_workers(_worker, 2, 1, 2, 0, timeout=120)
