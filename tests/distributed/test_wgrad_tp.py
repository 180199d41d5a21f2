"""Under tensor parallelism zb-h1's W pass issues no collective (they all sit on the input-gradient
path of the I pass), and the deferred weight gradients equal autograd's."""

import torch
import torch.distributed as dist

from megaloom.config import load_config
from megaloom.model import build_model
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.wgrad import WeightGradStore

from .launch import run_workers


def _worker(rank, world):
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.layers=2", "model.hidden=32", "model.heads=4", "model.vocab_size=64",
                             "model.seq_len=16", "data.vocab_size=64", f"parallel.tp={world}"])
    tp = TPGroup(dist.new_group(list(range(world))), world, rank)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_model = build_model(cfg.model, 0, tp=tp)
    ref_model(x, x).backward()
    model = build_model(cfg.model, 0, tp=tp)
    store = WeightGradStore()
    with store.recording(0):
        loss = model(x, x)
    with store.recording(0), store.deferred():
        loss.backward()
    tp.counter.take()
    calls = []
    originals = {}
    for name in ("all_reduce", "all_gather", "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "broadcast", "isend", "irecv", "batch_isend_irecv"):
        originals[name] = getattr(dist, name)
        setattr(dist, name, lambda *a, _n=name, **k: calls.append(_n) or originals[_n](*a, **k))
    try:
        store.flush(0)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert calls == [] and tp.counter.take() == {}
    assert store.gemms >= 8  # qkv, proj, up, down of two layers
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_w_pass_issues_no_collective_tp2():
    run_workers(_worker, 2, timeout=60)
