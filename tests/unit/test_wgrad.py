"""zb-h1's W pass runs only the weight-gradient GEMMs the I pass stashed: F + I + W costs the FLOPs of
F + B (torch.utils.flop_counter), the gradients equal autograd's, and W issues no collective."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megaloom.config import load_config
from megaloom.model import build_model
from megaloom.parallel.wgrad import WeightGradStore


def _model(recompute="none"):
    cfg = load_config(None, ["model.family='llama'", "model.layers=2", "model.hidden=64", "model.heads=4",
                             "model.vocab_size=128", "model.seq_len=32", "data.vocab_size=128"])
    model = build_model(cfg.model, 0)
    if recompute != "none":
        from megaloom.model.recompute import set_recompute
        set_recompute(model, recompute)
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    return model, x, y


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_f_i_w_costs_f_b_and_equals_autograd(recompute):
    model, x, y = _model(recompute)
    out = {}
    f_ref = _flops(lambda: out.update(loss=model(x, y)))
    b_ref = _flops(lambda: out["loss"].backward())
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    store = WeightGradStore()

    def forward():
        with store.recording(0):
            out["loss"] = model(x, y)

    def i_pass():
        with store.recording(0), store.deferred():
            out["loss"].backward()

    f, i = _flops(forward), _flops(i_pass)
    assert store.pending(0) > 0
    w = _flops(lambda: store.flush(0))
    assert f == f_ref and w > 0 and store.pending(0) == 0
    # under full recomputation too: the store's linear saves its tensors before its GEMM, so the
    # recomputed forward stops before each layer's last GEMM, as autograd's own does
    assert (f + i + w) / (f_ref + b_ref) == pytest.approx(1.0, abs=0.02)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_the_old_second_walk_costs_more():
    """Before: the I pass was autograd.grad to the input and the W pass a second backward to the
    parameters, which redoes the input-gradient GEMMs of every layer above the first: more than F + B.
    The store's F + I + W on the same middle stage stays at F + B."""
    from megaloom.model.init import init_model
    from megaloom.model.transformer import Transformer

    model, _, _ = _model()
    stage = Transformer(model.cfg, range(2), first=False, last=False)
    init_model(stage, 0)
    h = torch.randn(2, 32, 64, requires_grad=True)
    g = torch.randn(2, 32, 64)
    out = {}
    f = _flops(lambda: out.update(y=stage(h)))
    b = _flops(lambda: out["y"].backward(g))
    params = list(stage.parameters())
    out["y"] = stage(h)
    old = _flops(lambda: torch.autograd.grad(out["y"], h, g, retain_graph=True)) + _flops(
        lambda: torch.autograd.backward(out["y"], g, inputs=params))
    assert (f + old) / (f + b) > 1.1
    store = WeightGradStore()
    with store.recording(0):
        y = stage(h)
    with store.recording(0), store.deferred():
        i = _flops(lambda: y.backward(g))
    w = _flops(lambda: store.flush(0))
    assert (f + i + w) / (f + b) == pytest.approx(1.0, abs=0.02)
