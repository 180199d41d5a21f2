"""Pipeline parallelism (every schedule, with and without tensor parallelism) equals one process."""

import pytest
import torch
import torch.distributed as dist

from megaloom.config import load_config
from megaloom.model import build_model
from megaloom.parallel.grid import ProcessGrid
from megaloom.parallel.p2p_plan import P2PBatch, comm_plan
from megaloom.parallel.schedules import Op, simulate
from megaloom.train.assemble import setup_training
from megaloom.train.optim import build_optimizer
from megaloom.train.step import train_step

from .launch import run_workers

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)]
# optimizer steps per run: the first checks gradients, the rest that updates, accumulation and dropout's masks
# stay the single process's (5: every step after the second exercises the same code; 10 cost CI ~2 min)
STEPS = 5


def _cfg(family, tp, pp, schedule, chunks, sp=False, dropout=0.0, extra=()):
    sets = [f"model.family={family!r}", "model.layers=8", "model.hidden=32", "model.heads=4", "model.vocab_size=64",
            "model.seq_len=16", f"model.dropout={dropout}", "train.global_batch=16", "train.micro_batch=2",
            "train.lr=0.003", "train.grad_clip=0.5", "data.vocab_size=64", f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"parallel.schedule={schedule!r}", f"parallel.chunks={chunks}", f"parallel.sequence_parallel={str(sp).lower()}"]
    if family == "llama":
        sets.append("model.kv_heads=2")
    return load_config(None, sets + list(extra))


def _batch(cfg, step):
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch, cfg.model.seq_len + 1),
                      generator=torch.Generator().manual_seed(step))
    return list(zip(x[:, :-1].split(cfg.train.micro_batch), x[:, 1:].split(cfg.train.micro_batch)))


def _reference(cfg, steps):
    """Single-process: first-step loss and gradients, then the loss curve."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.train.seed)
    opt = build_optimizer(model, cfg.train)
    curve, grads = [], None
    for step in range(steps):
        r = train_step(model, opt, _batch(cfg, step), grad_clip=cfg.train.grad_clip)
        curve.append(r.loss.item())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return torch.tensor(curve), grads


def _pipeline_worker(rank, world, family, tp, pp, sp):
    torch.set_num_threads(1)
    # the single-process reference does not depend on the schedule: compute it once per dropout
    refs = {d: _reference(_cfg(family, 1, 1, "1f1b", 1, dropout=d), STEPS) for d in (0.0, 0.1)}
    for schedule, chunks in SCHEDULES:
        for dropout in (0.0, 0.1):
            cfg = _cfg(family, tp, pp, schedule, chunks, sp, dropout)
            ref_curve, ref_grads = refs[dropout]
            grid = ProcessGrid.build(tp, pp, 1, rank=rank, world_size=world, model=cfg.model)
            pipe = setup_training(cfg, grid, torch.device("cpu"))
            model, opt = pipe.model, pipe.optimizer
            torch.manual_seed(0)
            curve = []
            for step in range(STEPS):
                r = train_step(model, opt, _batch(cfg, step), grad_clip=cfg.train.grad_clip, sync=pipe.sync,
                               pipeline=pipe.runner)
                loss = r.loss.clone()
                dist.all_reduce(loss, group=grid.pp_group)
                curve.append(loss.item())
                if step == 0 and dropout == 0.0:
                    _check_grads(pipe, ref_grads, f"{schedule} tp={tp} pp={pp}")
                    peak = pipe.runner.stats.peak_in_flight
                    # the runtime holds exactly the activations the simulator predicts for these action lists
                    expected = simulate(pipe.runner.schedule).peak_in_flight[grid.pp_rank]
                    assert peak == expected, (schedule, grid.pp_rank, peak, expected)
                    _check_wire_volume(pipe, cfg, tp, sp)
            torch.testing.assert_close(torch.tensor(curve), ref_curve, rtol=1e-4, atol=1e-4,
                                       msg=f"loss curve {schedule} tp={tp} pp={pp} dropout={dropout}")
            if dropout == 0.0:
                torch.testing.assert_close(curve[0], ref_curve[0].item(), rtol=1e-5, atol=1e-6)


def _check_wire_volume(pipe, cfg, tp, sp):
    """Scatter/gather (§4.1): each send carries b·s·h/t elements, with or without sequence parallelism."""
    sends = sum(1 for step in pipe.runner.train_plan if isinstance(step, P2PBatch)
                for a in step.ops if a.op in (Op.SEND_F, Op.SEND_B))
    b, s, h = cfg.train.micro_batch, cfg.model.seq_len, cfg.model.hidden
    assert pipe.runner.stats.sent_bytes == sends * b * s * h // tp * 4, (pipe.runner.stats.sent_bytes, sends)


def _check_grads(pipe, ref_grads, what):
    """Each rank holds some layers (and a tp shard of them): their gradients are the reference's."""
    for chunk in pipe.model:
        for name, p in chunk.named_parameters():
            ref = ref_grads[name]
            spec = getattr(p, "shard_spec", None)
            if spec is not None:
                ref = spec.take(ref)
            torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6, msg=f"{name} ({what})")


@pytest.mark.parametrize("family, tp, pp, sp", [
    ("gpt2", 1, 2, False), ("gpt2", 1, 4, False), ("llama", 2, 2, False), ("gpt2", 2, 2, True), ("gpt2", 2, 4, False),
])
def test_pipeline_equals_single_process(family, tp, pp, sp):
    run_workers(_pipeline_worker, tp * pp, family, tp, pp, sp, timeout=600)


def _count_worker(rank, world, schedule):
    torch.set_num_threads(1)
    cfg = _cfg("gpt2", 1, world, schedule, 1)
    grid = ProcessGrid.build(1, world, 1, rank=rank, world_size=world, model=cfg.model)
    pipe = setup_training(cfg, grid, torch.device("cpu"))
    train_step(pipe.model, pipe.optimizer, _batch(cfg, 0), sync=pipe.sync, pipeline=pipe.runner)
    peaks = [None] * world
    dist.all_gather_object(peaks, pipe.runner.stats.peak_in_flight)
    m = cfg.train.global_batch // cfg.train.micro_batch
    if schedule == "gpipe":
        assert peaks == [m] * world, peaks  # GPipe stores every micro-batch's activations
    else:
        assert peaks == [world - r for r in range(world)], peaks  # 1F1B: at most p in flight


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_measured_activations_in_flight(schedule):
    run_workers(_count_worker, 4, schedule, timeout=300)


# ---------------------------------------------------------------- NCCL's blocking rule, on gloo


def _check_plan_executed(pipe, cfg, grid):
    """The runtime executed exactly its communication plan: every pass and batch in order, and the
    planned sends (count and bytes, fp32 b·s·h each)."""
    runner = pipe.runner
    plan = comm_plan(runner.schedule)[grid.pp_rank]
    assert runner.stats.trace == [str(s) for s in plan]
    batches = [s for s in plan if isinstance(s, P2PBatch)]
    sends = sum(a.op.value.startswith("SEND") for b in batches for a in b.ops)
    assert runner.stats.batches == len(batches) and len(runner.stats.sends) == sends
    b, s, h = cfg.train.micro_batch, cfg.model.seq_len, cfg.model.hidden
    assert runner.stats.sent_bytes == sends * b * s * h * 4


def _strict_worker(rank, world, runs):
    """parallel.strict_p2p waits for every batch, sends included, right after issuing it: on gloo the
    runtime then runs under the rule that deadlocked the old interleaved batches on NCCL."""
    torch.set_num_threads(1)
    ref_curve, ref_grads = _reference(_cfg("gpt2", 1, 1, "1f1b", 1), 3)
    for schedule, chunks in runs:
        cfg = _cfg("gpt2", 1, world, schedule, chunks, extra=["parallel.strict_p2p=true"])
        grid = ProcessGrid.build(1, world, 1, rank=rank, world_size=world, model=cfg.model)
        pipe = setup_training(cfg, grid, torch.device("cpu"))
        assert pipe.runner.strict_p2p  # the config key reaches the runner through the assembly
        torch.manual_seed(0)
        curve = []
        for step in range(3):
            r = train_step(pipe.model, pipe.optimizer, _batch(cfg, step), grad_clip=cfg.train.grad_clip,
                           sync=pipe.sync, pipeline=pipe.runner)
            loss = r.loss.clone()
            dist.all_reduce(loss, group=grid.pp_group)
            curve.append(loss.item())
            if step == 0:
                _check_grads(pipe, ref_grads, f"{schedule} v={chunks} pp={world} strict")
                _check_plan_executed(pipe, cfg, grid)
        torch.testing.assert_close(torch.tensor(curve), ref_curve[:3], rtol=1e-4, atol=1e-4,
                                   msg=f"loss curve {schedule} v={chunks} pp={world} strict")


@pytest.mark.parametrize("pp, runs", [(2, [("interleaved", 2), ("1f1b", 1)]), (4, [("interleaved", 2)])])
def test_strict_p2p_equals_single_process(pp, runs):
    run_workers(_strict_worker, pp, runs, timeout=300)


# ---------------------------------------------------------------- what goes on the wire


def _wire_worker(rank, world, tp):
    """Under bf16 autocast every send is bf16 (the residual stream stays fp32) with b·s·h/t elements."""
    torch.set_num_threads(1)
    pp = world // tp
    cfg = _cfg("gpt2", tp, pp, "interleaved", 2, extra=["train.precision='bf16'"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.train.seed)
    ref = train_step(model, build_optimizer(model, cfg.train), _batch(cfg, 0), precision="bf16").loss
    grid = ProcessGrid.build(tp, pp, 1, rank=rank, world_size=world, model=cfg.model)
    pipe = setup_training(cfg, grid, torch.device("cpu"))
    r = train_step(pipe.model, pipe.optimizer, _batch(cfg, 0), precision="bf16", sync=pipe.sync, pipeline=pipe.runner)
    b, s, h = cfg.train.micro_batch, cfg.model.seq_len, cfg.model.hidden
    sends = pipe.runner.stats.sends
    assert sends and all(rec == (torch.bfloat16, b * s * h // tp) for rec in sends), sends
    assert pipe.runner.stats.sent_bytes == len(sends) * b * s * h // tp * 2
    assert all(p.dtype == torch.float32 for chunk in pipe.model for p in chunk.parameters())
    loss = r.loss.clone()
    dist.all_reduce(loss, group=grid.pp_group)
    # bf16 on the wire rounds what the single process keeps in fp32: close, not equal
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)


def test_bf16_on_the_wire():
    run_workers(_wire_worker, 4, 2, timeout=300)
