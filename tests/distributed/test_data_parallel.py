"""Data parallelism and ZeRO-1/2/3, alone and composed with tensor and pipeline parallelism (PTD-P), equal
the single-process run: loss curve, gradient norm before and after clipping, final parameters."""

import pytest
import torch
import torch.distributed as dist

from megaloom.config import load_config
from megaloom.model import build_model
from megaloom.parallel.data import DPGroup, PowerSGD, ShardedAdamW, optimizer_state_bytes, tensor_bytes
from megaloom.parallel.grid import ProcessGrid
from megaloom.train.assemble import setup_training
from megaloom.train.optim import build_optimizer
from megaloom.train.step import train_step

from .launch import run_workers

STEPS = 5  # optimizer steps: after the second every step runs the same code (10 cost CI ~1 min)


def _cfg(tp=1, pp=1, dp=1, schedule="1f1b", chunks=1, zero=0, reduce="fp32", family="gpt2", powersgd=0):
    sets = [f"model.family={family!r}", "model.layers=4", "model.hidden=32", "model.heads=4", "model.vocab_size=64",
            "model.seq_len=16", "train.global_batch=16", "train.micro_batch=1", "train.lr=0.003",
            "train.grad_clip=0.3", "data.vocab_size=64", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}",
            f"parallel.schedule={schedule!r}", f"parallel.chunks={chunks}", f"parallel.zero={zero}",
            f"parallel.grad_reduce_dtype={reduce!r}", f"parallel.powersgd_rank={powersgd}"]
    return load_config(None, sets)


def _global_batch(cfg, step):
    return torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch, cfg.model.seq_len + 1),
                         generator=torch.Generator().manual_seed(step))


def _micro(x, cfg, dp_rank=0, dp=1):
    """This replica's contiguous slice of the global batch, in micro-batches (as BatchLoader gives it)."""
    local = x[dp_rank * len(x) // dp:(dp_rank + 1) * len(x) // dp]
    return list(zip(local[:, :-1].split(cfg.train.micro_batch), local[:, 1:].split(cfg.train.micro_batch)))


def _reference(cfg, steps):
    model = build_model(cfg.model, cfg.train.seed)
    opt = build_optimizer(model, cfg.train)
    losses, norms = [], []
    for step in range(steps):
        r = train_step(model, opt, _micro(_global_batch(cfg, step), cfg), grad_clip=cfg.train.grad_clip)
        losses.append(r.loss.item())
        norms.append(r.grad_norm.item())
    return torch.tensor(losses), torch.tensor(norms), dict(model.named_parameters())


def _layout_worker(rank, world, tp, pp, dp, variants):
    torch.set_num_threads(1)
    ref_losses, ref_norms, ref_params = _reference(_cfg(), STEPS)
    for schedule, chunks, zero in variants:
        cfg = _cfg(tp, pp, dp, schedule, chunks, zero)
        grid = ProcessGrid.build(tp, pp, dp, rank=rank, world_size=world, model=cfg.model)
        parts = setup_training(cfg, grid, torch.device("cpu"))
        losses, norms = [], []
        for step in range(STEPS):
            micro = _micro(_global_batch(cfg, step), cfg, grid.dp_rank, dp)
            r = train_step(parts.model, parts.optimizer, micro, grad_clip=cfg.train.grad_clip, sync=parts.sync,
                           pipeline=parts.runner)
            loss = r.loss.clone()
            if pp > 1:
                dist.all_reduce(loss, group=grid.pp_group)
            if dp > 1:
                dist.all_reduce(loss, group=grid.dp_group)
            losses.append(loss.item() / dp)
            norms.append(r.grad_norm.item())
            if step == 0:  # the clipped gradients have the single-process clipped norm
                clipped = parts.sync.norm([p for p in parts.model.parameters()]).item()
                assert clipped == pytest.approx(min(cfg.train.grad_clip, ref_norms[0].item()), rel=1e-5)
        what = f"tp={tp} pp={pp} dp={dp} {schedule} v={chunks} zero={zero}"
        torch.testing.assert_close(torch.tensor(losses), ref_losses, rtol=1e-4, atol=1e-4, msg=f"loss {what}")
        torch.testing.assert_close(torch.tensor(norms), ref_norms, rtol=1e-4, atol=1e-5, msg=f"grad norm {what}")
        for name, p in parts.model.named_parameters():
            name = name.split(".", 1)[1] if pp > 1 else name  # ModuleList prefix "0." of pipeline chunks
            ref = ref_params[name].detach()
            spec = getattr(p, "shard_spec", None)
            ref = spec.take(ref) if spec is not None else ref
            mine = p.full_tensor() if zero >= 2 else p.detach()  # ZeRO-2/3: reassemble the dp split
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5, msg=f"{name} {what}")
        if zero >= 1:
            params = list(parts.model.parameters())
            full = 2 * sum(p.numel() * 4 for p in params)  # Adam's two moments, fp32, unsharded
            held = optimizer_state_bytes(parts.optimizer)
            assert isinstance(parts.optimizer, ShardedAdamW) == (zero == 1)
            # 1/d, up to padding of each sharded tensor to a multiple of d and Adam's step counters
            assert abs(held - full / dp) <= 8 * dp * len(params) + 64, (held, full, dp)
        if zero == 3:  # between steps a rank holds about 1/d of the parameters
            held = sum(tensor_bytes(p) for p in parts.model.parameters())
            total = sum(p.numel() * 4 for p in parts.model.parameters())
            assert abs(held - total / dp) <= 4 * dp * len(params), (held, total, dp)


@pytest.mark.parametrize("tp, pp, dp, variants", [
    (2, 2, 2, [("1f1b", 1, 0), ("interleaved", 2, 1), ("1f1b", 1, 3)]),
    (1, 1, 8, [("1f1b", 1, 0), ("1f1b", 1, 1), ("1f1b", 1, 2), ("1f1b", 1, 3)]),
    (2, 1, 4, [("1f1b", 1, 0), ("1f1b", 1, 1), ("1f1b", 1, 2), ("1f1b", 1, 3)]),
    (1, 2, 4, [("1f1b", 1, 0), ("interleaved", 2, 1), ("1f1b", 1, 2), ("interleaved", 2, 3)]),
], ids=["t2p2d2", "d8", "t2d4", "p2d4"])
def test_ptd_p_equals_single_process(tp, pp, dp, variants):
    run_workers(_layout_worker, tp * pp * dp, tp, pp, dp, variants, timeout=600)


def _compression_worker(rank, world):
    torch.set_num_threads(1)
    curves, sent = {}, {}
    for reduce, powersgd in (("fp32", 0), ("bf16", 0), ("fp32", 2)):
        cfg = _cfg(dp=world, reduce=reduce, powersgd=powersgd)
        grid = ProcessGrid.build(1, 1, world, rank=rank, world_size=world, model=cfg.model)
        parts = setup_training(cfg, grid, torch.device("cpu"))
        losses = []
        for step in range(100):
            micro = _micro(_global_batch(cfg, step % 10), cfg, grid.dp_rank, world)
            losses.append(train_step(parts.model, parts.optimizer, micro, grad_clip=1.0, sync=parts.sync).loss.item())
        key = f"powersgd{powersgd}" if powersgd else reduce
        curves[key], sent[key] = torch.tensor(losses), parts.dp_buffer.sent_bytes()
    # documented tolerance (docs/parallelism.md): the bf16-reduced loss curve stays within 1% of fp32
    rel = ((curves["bf16"] - curves["fp32"]).abs() / curves["fp32"]).max().item()
    assert rel < 0.01, rel
    assert curves["bf16"][-1] < curves["bf16"][0] - 0.2, (curves["bf16"][0], curves["bf16"][-1], rel)  # it trains
    assert sent["bf16"] == sent["fp32"] / 2
    # PowerSGD rank 2 sends a fraction of the bytes and still trains, more slowly (docs/parallelism.md
    # records the measured gap on this memorisation task: last-10-step mean 4.01 vs 3.83 for fp32)
    assert sent["powersgd2"] < sent["fp32"] / 4, sent
    assert curves["powersgd2"][-10:].mean() < curves["powersgd2"][:10].mean() - 0.1


def _powersgd_exact_worker(rank, world):
    """When the averaged gradient has rank <= r, PowerSGD reconstructs it exactly (P·Pᵀ·M = M)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    w = torch.nn.Parameter(torch.zeros(12, 10))
    b = torch.nn.Parameter(torch.zeros(12))
    u, v = torch.randn(12, 1, generator=gen), torch.randn(1, 10, generator=gen)
    w.grad, b.grad = u @ v, torch.randn(12, generator=gen)  # rank 1 per replica: rank <= 2 on average
    grads = [torch.empty_like(w.grad) for _ in range(world)]
    dist.all_gather(grads, w.grad.clone())
    vec = [torch.empty_like(b.grad) for _ in range(world)]
    dist.all_gather(vec, b.grad.clone())
    PowerSGD([w, b], DPGroup(None, world, rank), rank=2, seed=0).reduce()
    torch.testing.assert_close(w.grad, sum(grads) / world, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, sum(vec) / world, rtol=1e-6, atol=1e-6)


def test_powersgd_is_exact_for_low_rank_gradients():
    run_workers(_powersgd_exact_worker, 2, timeout=120)


def test_gradient_compression_bf16_and_powersgd():
    run_workers(_compression_worker, 2, timeout=600)


def _zero1_scatter_worker(rank, world, tp, dp):
    """ZeRO-1 reduce-scatters the gradient buckets into each rank's ranges, all-reduces no gradients,
    keeps no second gradient buffer, and still equals the single process (loss, grad norm, parameters)."""
    torch.set_num_threads(1)
    steps = 3
    ref_losses, ref_norms, ref_params = _reference(_cfg(), steps)
    cfg = _cfg(tp=tp, dp=dp, zero=1)
    grid = ProcessGrid.build(tp, 1, dp, rank=rank, world_size=world, model=cfg.model)
    parts = setup_training(cfg, grid, torch.device("cpu"))
    buf, opt = parts.dp_buffer, parts.optimizer
    assert buf.scatter and not hasattr(opt, "flat_grad")
    # the optimizer's gradients are views into this rank's ranges of the reduce-scattered buffer
    owned = sum(e - s for s, e in buf.owned)
    shards = [q for g in opt.param_groups for q in g["params"]]
    assert all(q.grad.data_ptr() >= buf.data.data_ptr() for q in shards)
    assert sum(q.numel() for q in shards) <= owned
    assert buf.data.numel() == owned * dp
    for step in range(steps):
        buf.counter.take()
        r = train_step(parts.model, opt, _micro(_global_batch(cfg, step), cfg, grid.dp_rank, dp),
                       grad_clip=cfg.train.grad_clip, sync=parts.sync)
        sent = buf.counter.take()
        grad_bytes = buf.data.numel() * 4
        assert sent.get("all_reduce", 0.0) == 0.0, sent
        assert sent["reduce_scatter"] == pytest.approx((dp - 1) / dp * grad_bytes), (sent, grad_bytes)
        assert buf.sent_bytes() == pytest.approx(sent["reduce_scatter"])
        loss = r.loss.clone()
        dist.all_reduce(loss, group=grid.dp_group)
        assert loss.item() / dp == pytest.approx(ref_losses[step].item(), abs=1e-5), step
        assert r.grad_norm.item() == pytest.approx(ref_norms[step].item(), rel=1e-5, abs=1e-6), step
    for name, p in parts.model.named_parameters():
        spec = getattr(p, "shard_spec", None)
        ref = spec.take(ref_params[name].detach()) if spec is not None else ref_params[name].detach()
        torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("tp, dp", [(1, 2), (2, 2)], ids=["d2", "t2d2"])
def test_zero1_reduce_scatters(tp, dp):
    run_workers(_zero1_scatter_worker, tp * dp, tp, dp, timeout=120)
