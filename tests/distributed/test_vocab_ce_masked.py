"""The vocab-parallel loss honours -100 targets exactly like the single-device chunked loss, and is
chunked the same way: equal loss and gradients at tp = 2, 4, with and without sequence parallelism,
with masked rows, a fully masked chunk and a fully masked batch; no N x V/t fp32 tensor is created. With
V = 201, which neither t divides, the last rank's padding rows get a zero gradient."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megaloom.config import load_config
from megaloom.model import build_model
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.grid import ProcessGrid
from megaloom.parallel.tensor import sync_replicated_grads

from .launch import run_workers

N_ROWS = 2 * 16  # tokens of a batch; vocabularies 200 and 201 (V/t unlike any other dim)


def _cfg(tp, V):
    return load_config(None, ["model.family='llama'", "model.layers=1", "model.hidden=32", "model.heads=4",
                              f"model.vocab_size={V}", "model.seq_len=16", "data.vocab_size=64", f"parallel.tp={tp}"])


def _targets(case, V):
    y = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    if case == "some":
        y[0, ::3] = -100
        y[1, :8] = -100  # a whole chunk of 8 rows
    elif case == "all":
        y[:] = -100
    return y


class LogitRows(TorchDispatchMode):
    """The most rows of any fp32 (rows, V/t) tensor an op produces: logits or their softmax."""

    def __init__(self, shard):
        super().__init__()
        self.shard, self.rows = shard, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view allocates nothing (w.t() of the weight shard)
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 2 and t.shape[-1] == self.shard:
                self.rows = max(self.rows, t.numel() // self.shard)
        return out


def _worker(rank, world, sp, V):
    torch.set_num_threads(1)
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    cfg = _cfg(world, V)
    grid = ProcessGrid.build(world, 1, 1, rank=rank, world_size=world, model=cfg.model)
    tp = TPGroup(grid.tp_group, world, rank, sequence_parallel=sp)
    for case in ("some", "all", "none"):
        y = _targets(case, V)
        ref = build_model(cfg.model, 0)
        ref.head.chunk_rows = 8
        ref_loss = ref(x, y)
        ref_loss.backward()
        if case == "none":  # the unmasked mean equals F.cross_entropy on the full logits
            logits = ref(x)
            torch.testing.assert_close(ref_loss, torch.nn.functional.cross_entropy(logits.reshape(-1, V),
                                                                                   y.reshape(-1)))
        model = build_model(cfg.model, 0, tp=tp)
        model.head.chunk_rows = 8
        watch = LogitRows(model.head.real)  # the rank's vocabulary rows, padding left out
        with watch:
            loss = model(x, y)
            loss.backward()
        # one chunk's logits (8 x V/t) at a time, never the N x V/t of the batch
        assert 0 < watch.rows <= 8, watch.rows
        sync_replicated_grads(model, tp)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=case)
        if case == "all":
            assert loss.item() == 0.0
        refs = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            g = refs[name].grad
            spec = getattr(p, "shard_spec", None)
            g = spec.take(g) if spec is not None else g  # zero on the padding rows
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")


@pytest.mark.parametrize("tp, sp, vocab", [(2, False, 200), (2, True, 201), (4, False, 201), (4, True, 200)])
def test_masked_targets_equal_one_device(tp, sp, vocab):
    run_workers(_worker, tp, sp, vocab, timeout=120)
