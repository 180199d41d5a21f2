"""Recomputation under tensor + sequence parallelism (2 gloo processes): the recomputed forward
reissues its all-gathers and reduce-scatters and replays its sequence-sharded dropout masks."""

import torch
import torch.distributed as dist

from megaloom.config import ModelConfig
from megaloom.model import Transformer, build_model, init_model
from megaloom.model.recompute import set_recompute
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.grads import GradSync
from megaloom.parallel.tensor import gather_full, parallelize_tensor
from megaloom.train.step import train_step
from tests.distributed.launch import run_workers

CFG = dict(family="llama", layers=2, hidden=64, heads=8, kv_heads=4, vocab_size=128, seq_len=16, dropout=0.1)


def _steps(model, sync):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(2):
        x = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(step))
        micro = list(zip(x[:, :-1].split(2), x[:, 1:].split(2)))
        losses.append(train_step(model, opt, micro, sync=sync).loss)
    return torch.stack(losses)


def _worker(rank, world):
    torch.set_num_threads(1)
    torch.manual_seed(5)  # the run's seed, from which every rank derives the same dropout masks
    cfg = ModelConfig(**CFG)
    ref = build_model(cfg, 3)
    ref_losses = _steps(ref, None)
    for mode in ("selective", "full"):
        tp = TPGroup(None, world, rank, sequence_parallel=True)
        model = parallelize_tensor(Transformer(cfg), tp)
        init_model(model, 3)
        set_recompute(model, mode)
        torch.testing.assert_close(_steps(model, GradSync(model, tp)), ref_losses, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(gather_full(p, tp), q.detach(), rtol=1e-5, atol=1e-6, msg=f"{name} {mode}")
    dist.barrier()


def test_recompute_with_tensor_and_sequence_parallelism():
    run_workers(_worker, 2, timeout=120)
