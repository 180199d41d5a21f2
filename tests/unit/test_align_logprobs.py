"""Per-token log-probabilities, entropies and sequence sums equal TRL's (selective_log_softmax, entropy_from_logits,
get_batch_logps) to 1e-6; their gradients equal autograd through log_softmax; the head path equals the logits path;
and no (rows, V) fp32 tensor of more than one chunk's rows is ever created, forward or backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from megaloom.align import sequence_logprobs, token_entropy, token_logprobs, token_logprobs_and_entropy
from tests.align_refs import trl_batch_logps

TOL = {"rtol": 1e-6, "atol": 1e-6}
B, T, V, H = 3, 7, 50, 16


def _data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = -100  # a masked prompt
    targets[2, 5:] = -100  # padding
    return g, logits, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_trl(temperature):
    """TRL's selective_log_softmax (with its temperature) on the unmasked tokens; 0 on -100 targets."""
    _, logits, targets = _data()
    before = logits.clone()
    ours = token_logprobs(logits, targets, chunk=4, temperature=temperature)
    assert torch.equal(logits, before)  # the chunks are worked on in place: copies, never the caller's logits
    theirs = selective_log_softmax(logits, targets.clamp(min=0), temperature=temperature)
    valid = targets != -100
    torch.testing.assert_close(ours[valid], theirs[valid], **TOL)
    assert (ours[~valid] == 0).all()


def test_entropy_equals_trl():
    _, logits, targets = _data(1)
    torch.testing.assert_close(token_entropy(logits, chunk=5), entropy_from_logits(logits), **TOL)
    _, ent = token_logprobs_and_entropy(logits, targets, chunk=2)
    valid = targets != -100
    torch.testing.assert_close(ent[valid], entropy_from_logits(logits)[valid], **TOL)
    assert (token_entropy(logits, mask=valid)[~valid] == 0).all()


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_equal_trl(average):
    """TRL's get_batch_logps (CPO trainer; it shifts labels itself, so it is given one more position), sum and
    length-averaged."""
    _, logits, targets = _data(2)
    seq = sequence_logprobs(token_logprobs(logits, targets), targets)
    shifted_logits = torch.cat([logits, logits[:, :1]], dim=1)
    shifted_labels = torch.cat([torch.full((B, 1), -100), targets], dim=1)
    theirs = trl_batch_logps(shifted_logits, shifted_labels, average_log_prob=average)
    torch.testing.assert_close(seq.mean if average else seq.sum, theirs, **TOL)
    assert seq.tokens.tolist() == (targets != -100).sum(1).tolist()


def _reference(logits, targets, temperature=1.0):
    """log p and H by autograd through the full log_softmax."""
    logp_all = F.log_softmax(logits / temperature, dim=-1)
    valid = targets != -100
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, ent


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_gradients_equal_autograd(temperature):
    """d(Σ a·log p + Σ b·H) with respect to the logits, and (head path) to h and the weight, equal autograd through
    F.log_softmax, for arbitrary upstream weights a, b."""
    g, _, targets = _data(3)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    a, b = torch.randn(2, B, T, generator=g, dtype=torch.float64)
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = _reference(ref_h @ ref_w.t(), targets, temperature)
    ((a * logp).sum() + (b * ent).sum()).backward()

    our_h, our_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, en = token_logprobs_and_entropy(our_h, targets, our_w, chunk=4, temperature=temperature)
    torch.testing.assert_close(lp, logp, **TOL)
    torch.testing.assert_close(en, ent, **TOL)
    ((a * lp).sum() + (b * en).sum()).backward()
    torch.testing.assert_close(our_h.grad, ref_h.grad, **TOL)
    torch.testing.assert_close(our_w.grad, ref_w.grad, **TOL)

    logits = (h @ w.t()).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    logp, ent = _reference(ref_logits, targets, temperature)
    ((a * logp).sum() + (b * ent).sum()).backward()
    lp, en = token_logprobs_and_entropy(logits, targets, chunk=3, temperature=temperature)
    ((a * lp).sum() + (b * en).sum()).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, **TOL)


def test_chunk_size_does_not_matter():
    _, logits, targets = _data(4, torch.float32)
    want = token_logprobs_and_entropy(logits, targets, chunk=B * T)
    for chunk in (1, 5, 1000):
        for got, ref in zip(token_logprobs_and_entropy(logits, targets, chunk=chunk), want):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_head_under_autocast_rounds_like_f_linear():
    """Under bf16 autocast the head path's logits are rounded as F.linear's would be (then fp32 statistics)."""
    g, _, targets = _data(5)
    h, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h, w)
        ours = token_logprobs(h, targets, w, chunk=4)
    assert logits.dtype == torch.bfloat16 and ours.dtype == torch.float32
    torch.testing.assert_close(ours, token_logprobs(logits, targets), rtol=1e-5, atol=1e-5)


class LogitRows(TorchDispatchMode):
    """The most rows of any fp32 (rows, V) tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 2 and t.shape[-1] == V:
                self.rows = max(self.rows, t.numel() // V)
        return out


def test_no_full_fp32_logits():
    """The head path keeps at most one chunk of fp32 logits, forward and backward (the weight's own (V, H) is not
    logits: H != the 4 rows of a chunk)."""
    g, _, targets = _data(6)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    watch = LogitRows()
    with watch:
        lp, en = token_logprobs_and_entropy(h, targets, w, chunk=4)
        (lp.sum() + en.sum()).backward()
    assert 0 < watch.rows <= 4, watch.rows
    assert h.grad is not None and w.grad is not None


def test_bad_arguments():
    _, logits, targets = _data()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, targets, temperature=0)
    with pytest.raises(ValueError, match="positions"):
        token_logprobs(logits, targets[:, :-1])
