"""Measured = modelled: the bytes rank 0 sends in one training step at (t, p, d) = (2, 2, 2), by group
(tp, pp, dp), equal `megaloom simulate`'s stage-0 prediction within 1%, and the parameter, gradient and
optimizer-state bytes it holds equal the planner's `memory_state_gib` within 5% (and every rank's its
stage's `memory_state_gib_per_stage`): with and without
sequence parallelism, ZeRO 0, 1 and 3, 1F1B and interleaved (chunks 2), configs/debug.toml at 4 layers.
All layouts run in one launch of 8 gloo processes (one grid; `build_parallel_model` is reusable).
On the way, when each chunk's data-parallel reduction starts is recorded: right after its last
backward of the step, so under interleaving chunk 1's reduction runs while chunk 0 still computes."""

import itertools

import pytest
import torch
import torch.distributed as dist

from megaloom.config import load_config
from megaloom.parallel.data import optimizer_state_bytes, tensor_bytes
from megaloom.parallel.grid import ProcessGrid
from megaloom.perf.commands import simulate_config
from megaloom.train.assemble import setup_training
from megaloom.train.step import train_step

from .launch import run_workers

LAYOUTS = [dict(sp=sp, zero=zero, schedule=schedule)
           for sp, zero, schedule in itertools.product((False, True), (0, 1, 3), ("1f1b", "interleaved"))]
# and under bf16 autocast, where the wire, the layers' `g` collectives and FSDP's gathers are bf16
LAYOUTS += [dict(sp=sp, zero=zero, schedule="interleaved", precision="bf16") for sp, zero in ((False, 0), (True, 3))]


def _overrides(sp, zero, schedule, precision="fp32"):
    chunks = 2 if schedule == "interleaved" else 1
    return ["model.layers=4", "train.micro_batch=1", "parallel.tp=2", "parallel.pp=2", "parallel.dp=2",
            f"parallel.sequence_parallel={str(sp).lower()}", f"parallel.zero={zero}",
            f"parallel.schedule={schedule}", f"parallel.chunks={chunks}", f"train.precision='{precision}'"]


def _measure(rank, world, out):
    results = []
    for lay in LAYOUTS:
        cfg = load_config("configs/debug.toml", _overrides(**lay))
        grid = ProcessGrid.build(2, 2, 2, rank=rank, world_size=world, model=cfg.model)
        parts = setup_training(cfg, grid, torch.device("cpu"))
        launches = _spy_on_launches(parts) if parts.dp_buffer is not None else None
        m, t = cfg.model, cfg.train
        gen = torch.Generator().manual_seed(grid.dp_rank)
        x = torch.randint(0, m.vocab_size, (t.global_batch // grid.dp, m.seq_len + 1), generator=gen)
        micro = list(zip(x[:, :-1].split(t.micro_batch), x[:, 1:].split(t.micro_batch)))
        train_step(parts.model, parts.optimizer, micro, precision=t.precision, grad_clip=t.grad_clip, sync=parts.sync,
                   pipeline=parts.runner)
        sent = parts.take_comm_bytes()
        params = list(parts.model.parameters())
        held = (sum(tensor_bytes(p) for p in params) + sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
                + optimizer_state_bytes(parts.optimizer))
        if parts.dp_buffer is not None and parts.dp_buffer.data.numel() > sum(p.numel() for p in params):
            held += tensor_bytes(parts.dp_buffer.data) - sum(p.numel() for p in params) * 4  # ZeRO-1's padding
        every = [None] * world
        dist.all_gather_object(every, held)  # each rank's state, for the per-stage comparison
        results.append((sent, held, every))
        if launches is not None:
            _check_launches(launches, parts.runner.stats.trace, cfg.parallel.chunks)
        dist.barrier()
    if rank == 0:
        torch.save(results, out)


def _spy_on_launches(parts):
    """(trace position, chunk) of every bucket reduction the gradient buffer starts."""
    chunk_of = {id(p): c for c, chunk in enumerate(parts.model) for p in chunk.parameters()}
    buffer, launches = parts.dp_buffer, []
    launch = buffer._launch

    def spy(bucket, early=False):
        if bucket.work is None:
            launches.append((len(parts.runner.stats.trace), {chunk_of[id(p)] for p in bucket.params}))
        launch(bucket, early)

    buffer._launch = spy
    return launches


def _check_launches(launches, trace, chunks):
    last_backward = {c: max(i for i, a in enumerate(trace) if a.startswith(f"{c}B")) for c in range(chunks)}
    assert {c for _, owners in launches for c in owners} == set(range(chunks))
    for position, owners in launches:
        assert len(owners) == 1, "a bucket spans two chunks"
        (c,) = owners
        assert position > last_backward[c], (c, position, last_backward)  # never before its last backward
    if chunks > 1:  # the chunk whose backwards end first reduces while the other still computes
        first, later = sorted(last_backward, key=last_backward.get)[0], max(last_backward.values())
        assert any(owners == {first} and position <= later for position, owners in launches), (launches, last_backward)


def test_rank0_bytes_equal_stage0_prediction(tmp_path):
    out = tmp_path / "measured.pt"
    run_workers(_measure, 8, str(out), timeout=300)
    results = torch.load(out)
    failures = []
    for lay, (sent, held, every) in zip(LAYOUTS, results):
        cfg = load_config("configs/debug.toml", _overrides(**lay))
        report = simulate_config(cfg, gpus=8)
        stage0 = report["comm_bytes_per_stage"][0]
        for kind in ("tp", "pp", "dp"):
            if sent[kind] != pytest.approx(stage0[kind], rel=0.01):
                failures.append(f"{lay} {kind}: measured {sent[kind]:.0f} {sorted(sent.items())}, "
                                f"modelled {stage0[kind]:.0f}")
        state = report["memory_state_gib"] * 2**30
        if held != pytest.approx(state, rel=0.05):
            failures.append(f"{lay} state: held {held} bytes, modelled {state:.0f}")
        for rank, got in enumerate(every):  # every rank against its own stage (rank = pp·dp·tp + dp·tp + tp)
            want = report["memory_state_gib_per_stage"][rank // 4] * 2**30
            if got != pytest.approx(want, rel=0.05):
                failures.append(f"{lay} rank {rank} state: held {got} bytes, modelled {want:.0f}")
    assert not failures, "\n".join(failures)
