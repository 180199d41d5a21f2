"""The chunked linear + cross entropy (megaloom/model/loss.py): the plain head's loss and gradients,
without keeping an (N, V) tensor for backward."""

import pytest
import torch
import torch.nn.functional as F

from bench.activations import retained_bytes
from megaloom.config import ModelConfig
from megaloom.model import build_model
from megaloom.model.loss import linear_cross_entropy

from .test_model import FAMILIES


def _plain(h, w, y):
    return F.cross_entropy(F.linear(h, w).float().view(-1, w.shape[0]), y.reshape(-1))


def _inputs(n=37, hidden=24, vocab=53, seed=0, ignore=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[:ignore] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 8, 37, 4096])
@pytest.mark.parametrize("ignore", [0, 5])
def test_chunked_equals_plain_fp32(chunk, ignore):
    h, w, y = _inputs(ignore=ignore)
    ref = _plain(h, w, y)
    gh, gw = torch.autograd.grad(ref * 3.0, (h, w))
    h2, w2, _ = _inputs(ignore=ignore)
    got = linear_cross_entropy(h2, w2, y, chunk=chunk)
    got_gh, got_gw = torch.autograd.grad(got * 3.0, (h2, w2))  # the incoming gradient is multiplied in
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_gh, gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_gw, gw, rtol=1e-5, atol=1e-7)


def test_chunked_under_bf16_autocast_matches_plain():
    h, w, y = _inputs(n=64, hidden=32, vocab=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _plain(h, w, y)
    gh, gw = torch.autograd.grad(ref, (h, w))
    h2, w2, _ = _inputs(n=64, hidden=32, vocab=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h2, w2, y, chunk=16)
    got_gh, got_gw = torch.autograd.grad(got, (h2, w2))
    assert got.dtype == torch.float32 and got_gh.dtype == got_gw.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # same bf16 logits, same fp32 softmax
    torch.testing.assert_close(got_gh, gh, rtol=0, atol=0)  # same bf16 GEMM on the same bf16 operands
    # dL/dW is summed over chunks in fp32 here, rounded once to bf16 there: compare both with the
    # float64 gradient of the same bf16-rounded logits' gradient, by relative norm
    dz = (torch.softmax(F.linear(h.to(torch.bfloat16), w.to(torch.bfloat16)).double(), -1)
          - F.one_hot(y, 96)).div(64).to(torch.bfloat16).double()
    exact = dz.t() @ h.detach().to(torch.bfloat16).double()
    err = lambda g: ((g.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(got_gw) <= err(gw) < 1e-2


def test_no_grad_and_frozen_inputs():
    h, w, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=8), _plain(h, w, y))
    (g,) = torch.autograd.grad(linear_cross_entropy(h, w.detach(), y, chunk=8), h)
    torch.testing.assert_close(g, torch.autograd.grad(_plain(h, w.detach(), y), h)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_loss_is_the_plain_loss(family):
    m = build_model(ModelConfig(**FAMILIES[family]), 0)
    m.head.chunk_rows = 7
    x = torch.randint(0, m.cfg.vocab_size, (3, 33), generator=torch.Generator().manual_seed(0))
    loss = m(x[:, :-1], x[:, 1:])
    grads = torch.autograd.grad(loss, list(m.parameters()))
    plain = m.head.loss(m(x[:, :-1]), x[:, 1:])
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    for (name, p), g in zip(m.named_parameters(), grads):
        torch.testing.assert_close(g, torch.autograd.grad(plain, p, retain_graph=True)[0], rtol=1e-5, atol=1e-7,
                                   msg=name)


def test_no_full_logits_kept_for_backward():
    """The plain head keeps fp32 N x V (and more) for backward; the chunked one keeps dL/dh (N x h)
    and dL/dW (V x h), both independent of the product N·V."""
    n, hidden, vocab = 512, 16, 1024
    h, w, y = _inputs(n=n, hidden=hidden, vocab=vocab)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    head.weight = torch.nn.Parameter(w.detach().clone())
    plain = retained_bytes(head, lambda: F.cross_entropy(head(h).float(), y), torch.bfloat16)
    chunked = retained_bytes(head, lambda: linear_cross_entropy(h, head.weight, y, chunk=64), torch.bfloat16)
    assert plain >= n * vocab * 4
    assert chunked <= n * hidden * 4 + vocab * hidden * 4 + 64  # the two gradients and scalars
