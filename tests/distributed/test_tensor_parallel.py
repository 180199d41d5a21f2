"""Tensor (and sequence) parallelism equals the single-device model: logits, loss, gradients, training."""

import pytest
import torch
import torch.distributed as dist

from megaloom.config import ModelConfig, TrainConfig
from megaloom.model import Transformer, build_model, init_model
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.grads import GradSync
from megaloom.parallel.tensor import gather_full, parallelize_tensor
from megaloom.train.optim import build_optimizer
from megaloom.train.step import train_step

from .launch import run_workers

FAMILIES = {
    "gpt2": dict(family="gpt2", layers=2, hidden=64, heads=8, vocab_size=128, seq_len=32),
    "llama": dict(family="llama", layers=2, hidden=64, heads=8, kv_heads=4, vocab_size=128, seq_len=32),
}
SEED = 11


def _batch(cfg, n=4, T=16, seed=0):
    x = torch.randint(0, cfg.vocab_size, (n, T + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def _tp_model(cfg, rank, world, sp):
    tp = TPGroup(None, world, rank, sequence_parallel=sp)
    model = parallelize_tensor(Transformer(cfg), tp)
    init_model(model, SEED)
    return model, tp


def _train(model, cfg, sync, steps):
    torch.manual_seed(5)  # dropout masks
    opt = build_optimizer(model, TrainConfig(lr=3e-3))
    losses = []
    for step in range(steps):
        x, y = _batch(cfg, seed=step)
        micro = list(zip(x.split(2), y.split(2)))
        losses.append(train_step(model, opt, micro, grad_clip=0.5, sync=sync).loss.item())
    return torch.tensor(losses)


# steps of the dropout loss curve: dropout's masks and the updates stay the single device's (after the second step
# every step runs the same code; 20 cost CI about a minute)
CURVE_STEPS = 8


def _parity_worker(rank, world, family):
    torch.set_num_threads(1)
    cfg = ModelConfig(**FAMILIES[family])
    ref = build_model(cfg, SEED)
    x, y = _batch(cfg)
    ref_logits = ref(x)
    ref_loss = ref(x, y)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_curve = _train(build_model(ModelConfig(**FAMILIES[family], dropout=0.1), SEED),
                       ModelConfig(**FAMILIES[family], dropout=0.1), None, CURVE_STEPS)

    for sp in (False, True):
        model, tp = _tp_model(cfg, rank, world, sp)
        # layout-independent init: every shard is the slice of the single-device tensor
        for name, p in model.named_parameters():
            torch.testing.assert_close(gather_full(p, tp), dict(ref.named_parameters())[name], rtol=0, atol=0)
        shard_logits = model(x)
        full_logits = torch.cat([torch.empty_like(shard_logits) for _ in range(world)], dim=-1)
        dist.all_gather(list(full_logits.chunk(world, dim=-1)), shard_logits.contiguous())
        torch.testing.assert_close(full_logits, ref_logits, rtol=1e-5, atol=1e-5)
        loss = model(x, y)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        loss.backward()
        GradSync(model, tp).finish()
        for name, p in model.named_parameters():
            torch.testing.assert_close(_gather_grad(p, tp), ref_grads[name],
                                       rtol=1e-5, atol=1e-6, msg=f"{name} sp={sp}")
        dcfg = ModelConfig(**FAMILIES[family], dropout=0.1)
        model, tp = _tp_model(dcfg, rank, world, sp)
        curve = _train(model, dcfg, GradSync(model, tp), CURVE_STEPS)
        torch.testing.assert_close(curve, ref_curve, rtol=1e-4, atol=1e-4, msg=f"loss curve sp={sp}")


def _gather_grad(p, tp):
    g = p.grad
    spec = getattr(p, "shard_spec", None)
    if spec is None:
        return g
    parts = [torch.empty_like(g) for _ in range(tp.size)]
    dist.all_gather(parts, g.contiguous())
    return spec.assemble(parts)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("t", [2, 4])
def test_tensor_parallel_equals_single_device(t, family):
    run_workers(_parity_worker, t, family, timeout=240)


def _comm_worker(rank, world, sp):
    torch.set_num_threads(1)
    b, s, h = 2, 16, 64
    sent = {}
    for layers in (2, 3):
        cfg = ModelConfig(**{**FAMILIES["gpt2"], "layers": layers})
        model, tp = _tp_model(cfg, rank, world, sp)
        x, y = _batch(cfg, n=b, T=s)
        model(x, y).backward()
        sent[layers] = sum(tp.counter.take().values())
    per_layer = sent[3] - sent[2]
    # Megatron-LM paper §3.2: 8·b·s·h·(t-1)/t elements per layer per micro-batch (fp32: 4 bytes each),
    # the same for sequence parallelism (all-gather + reduce-scatter in place of each all-reduce).
    assert per_layer == pytest.approx(8 * b * s * h * (world - 1) / world * 4), (sent, sp)


@pytest.mark.parametrize("sp", [False, True])
def test_tp_communication_volume_matches_paper(sp):
    run_workers(_comm_worker, 2, sp)
