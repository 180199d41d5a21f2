"""ZeRO-2/3 (FSDP2) under bf16: parameters are gathered in bf16 (half the all-gather bytes, what the
planner counts), gradients reduce-scattered in fp32 unless parallel.grad_reduce_dtype = "bf16", the
sharded master weights stay fp32, and the run equals the single-process bf16 run."""

import pytest
import torch
import torch.distributed as dist

from megaloom.config import load_config
from megaloom.model import build_model
from megaloom.parallel.grid import ProcessGrid
from megaloom.train.assemble import fsdp_precision, setup_training
from megaloom.train.optim import build_optimizer
from megaloom.train.step import train_step

from .launch import run_workers

STEPS = 4


def _cfg(dp=1, zero=0, family="llama"):
    return load_config(None, [f"model.family='{family}'", "model.layers=2", "model.hidden=32", "model.heads=4",
                              "model.vocab_size=64",
                              "model.seq_len=16", "train.global_batch=4", "train.micro_batch=1", "train.lr=0.003",
                              "data.vocab_size=64", "train.precision='bf16'", f"parallel.dp={dp}",
                              f"parallel.zero={zero}"])


def _batch(cfg, step, dp_rank=0, dp=1):
    x = torch.randint(0, 64, (cfg.train.global_batch, 17), generator=torch.Generator().manual_seed(step))
    x = x[dp_rank * len(x) // dp:(dp_rank + 1) * len(x) // dp]
    return list(zip(x[:, :-1].split(1), x[:, 1:].split(1)))


def test_policy_dtypes():
    p = fsdp_precision("bf16", "fp32")
    assert (p.param_dtype, p.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_precision("bf16", "bf16").reduce_dtype == torch.bfloat16
    assert fsdp_precision("fp32", "fp32").param_dtype is None  # fp32 runs gather fp32


def _worker(rank, world, family):
    torch.set_num_threads(1)
    ref_cfg = _cfg(family=family)
    ref = build_model(ref_cfg.model, ref_cfg.train.seed)
    opt = build_optimizer(ref, ref_cfg.train)
    ref_losses = [train_step(ref, opt, _batch(ref_cfg, s), precision="bf16").loss.item() for s in range(STEPS)]
    for zero in (2, 3):
        cfg = _cfg(world, zero, family)
        grid = ProcessGrid.build(1, 1, world, rank=rank, world_size=world, model=cfg.model)
        parts = setup_training(cfg, grid, torch.device("cpu"))
        seen = set()
        hook = parts.model.layers["0"].attn.qkv.register_forward_pre_hook(
            lambda m, _, seen=seen: seen.add(m.weight.dtype))
        losses = []
        for s in range(STEPS):
            r = train_step(parts.model, parts.optimizer, _batch(cfg, s, rank, world), sync=parts.sync, precision="bf16")
            loss = r.loss.clone()
            dist.all_reduce(loss)
            losses.append(loss.item() / world)
        hook.remove()
        assert seen == {torch.bfloat16}, seen  # the unsharded (all-gathered) weight is bf16
        assert all(p.dtype == torch.float32 for p in parts.model.parameters())  # fp32 master shards
        # bf16 rounds the norm weights too (the single process keeps them fp32 under autocast)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: LayerNorm with bf16-gathered weights, fp32 input
def test_zero_gathers_bf16_and_equals_one_process(family):
    run_workers(_worker, 2, family, timeout=120)
