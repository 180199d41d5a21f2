"""The distillation loss of a student against a frozen teacher, from both models' final hidden states and head
weights, chunked over tokens and split over the vocabulary: neither model's logits ever exist whole.

With s = student logits / τ and t = teacher logits / τ (τ: distill.temperature), p = softmax(s), q = softmax(t),
each scored token (target not -100) contributes

    forward_kl   KL(q || p) = Σ q (log q - log p)
    reverse_kl   KL(p || q) = Σ p (log p - log q)
    jsd          β KL(q || m) + (1 - β) KL(p || m),   m = β q + (1 - β) p

(the generalised Jensen-Shannon divergence of GKD, Agarwal et al. 2024, eq. 1; β = 0 and 1 are the two KLs, as
in TRL's `generalized_jsd_loss`, whose conventions these follow: no τ² factor). The loss is

    alpha · CE(student logits at temperature 1, targets) + (1 - alpha) · mean over scored tokens of the divergence

(alpha = 1 - kd_ratio of torchtune's knowledge-distillation recipes). torchtune's `ForwardKLLoss` is the cross
entropy -Σ q log p: KL(q || p) plus the teacher's entropy, which does not depend on the student (same gradient).

Vocab-parallel as `megaloom/parallel/vocab_loss.py` and `megaloom/align/logprobs.py` (Megatron-LM's vocab-parallel
cross entropy, reference/004 §2.3): each tp rank forms the logits of its own V/t vocabulary rows of each head,
`chunk` tokens at a time; per chunk three all-reduces over the tp group give the full-vocabulary values: the row
maxima (MAX, of s, t and the temperature-1 logits), then the sums of exponentials and the target's logit (SUM),
then each token's divergence (SUM; its terms need the normalised p and q). Every gradient term then involves only
this rank's columns and those per-token values:

    forward_kl   ∂/∂s_k = p_k - q_k
    reverse_kl   ∂/∂s_k = p_k (log p_k - log q_k - KL(p || q))
    jsd          ∂/∂s_k = (1 - β) p_k (log p_k - log m_k - KL(p || m))
    cross entropy ∂/∂z_k = softmax(z)_k - 1[k = y]

so, as in vocab_loss.py, each chunk's gradients with respect to the student's hidden states (this rank's partial
sum, which the column-parallel `f` before the head all-reduces) and head weight shard are formed in forward, while
the chunk's logits are at hand, and scaled by the incoming gradient in backward: one chunk's logits in memory, no
second pass. The teacher gets no gradient. Columns past the vocabulary (`real`, padding on the last rank where t
does not divide V) form no logit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from megaloom.parallel.comm import TPGroup, all_reduce_no_grad

IGNORE_INDEX = -100
LOSSES = ("forward_kl", "reverse_kl", "jsd")


class DistillTerms(NamedTuple):
    """`loss` = alpha · `ce` + (1 - alpha) · `kd`; only `loss` carries gradients."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


class _Spec(NamedTuple):
    kind: str
    beta: float
    temperature: float
    alpha: float
    start: int
    real: int
    chunk: int
    dtype: torch.dtype


def _divergence(kind: str, beta: float, logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                tp: TPGroup) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's divergence (full vocabulary, after the all-reduce) and, for jsd, log m of this rank's columns."""
    if kind == "forward_kl":
        part, logm = (q * (logq - logp)).sum(-1), None
        stats = part.unsqueeze(0)
    elif kind == "reverse_kl":
        part, logm = (p * (logp - logq)).sum(-1), None
        stats = part.unsqueeze(0)
    else:
        logm = torch.logaddexp(logp + math.log1p(-beta), logq + math.log(beta))
        stats = torch.stack([(q * (logq - logm)).sum(-1), (p * (logp - logm)).sum(-1)])
    all_reduce_no_grad(stats, tp)
    if kind == "jsd":
        return torch.stack([beta * stats[0] + (1 - beta) * stats[1], stats[1]]), logm
    return stats, logm


def _student_grad(kind: str, beta: float, logp: torch.Tensor, logq: torch.Tensor, logm: torch.Tensor | None,
                  p: torch.Tensor, q: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """∂ divergence / ∂ s on this rank's columns (see the module text)."""
    if kind == "forward_kl":
        return p - q
    if kind == "reverse_kl":
        return p * (logp - logq - stats[0].unsqueeze(-1))
    return (1 - beta) * p * (logp - logm - stats[1].unsqueeze(-1))


def _terms_and_grads(h: torch.Tensor, weight: torch.Tensor, th: torch.Tensor, tweight: torch.Tensor,
                     targets: torch.Tensor, tp: TPGroup, o: _Spec, need_h: bool, need_w: bool):  # noqa: ANN202
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32  # fp64 inputs stay fp64 (the parity tests)
    w, tw = weight[:o.real].to(o.dtype), tweight[:o.real].to(o.dtype)
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1).to(acc)
    kd_sum = torch.zeros((), dtype=acc, device=h.device)
    ce_sum = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
    grad_w_real = grad_w[:o.real] if need_w else None
    for begin in range(0, h.shape[0], o.chunk):
        sl = slice(begin, begin + o.chunk)
        hc, vc = h[sl].to(o.dtype), valid[sl].to(acc)
        local = targets[sl] - o.start
        inside = (local >= 0) & (local < o.real) & valid[sl]
        idx = local.clamp(0, o.real - 1).unsqueeze(-1)
        z = (hc @ w.t()).to(acc)  # the student's logits of this rank's rows, temperature 1 (the cross entropy's)
        t = (th[sl].to(o.dtype) @ tw.t()).to(acc).div_(o.temperature)
        s = z / o.temperature
        maxes = torch.stack([s.max(-1).values, t.max(-1).values, z.max(-1).values])
        all_reduce_no_grad(maxes, tp, dist.ReduceOp.MAX)
        logp, logq = s.sub_(maxes[0].unsqueeze(-1)), t.sub_(maxes[1].unsqueeze(-1))
        z.sub_(maxes[2].unsqueeze(-1))
        p, q, e = logp.exp(), logq.exp(), z.exp()
        sums = torch.stack([p.sum(-1), q.sum(-1), e.sum(-1), z.gather(-1, idx).squeeze(-1) * inside])
        all_reduce_no_grad(sums, tp)  # Σ e^s, Σ e^t, Σ e^z (shifted by their maxima), the target's logit
        logp.sub_(sums[0].log().unsqueeze(-1))
        logq.sub_(sums[1].log().unsqueeze(-1))
        p.div_(sums[0].unsqueeze(-1))
        q.div_(sums[1].unsqueeze(-1))
        stats, logm = _divergence(o.kind, o.beta, logp, logq, p, q, tp)
        kd_sum += (stats[0] * vc).sum()
        ce_sum += ((sums[2].log() - sums[3]) * vc).sum()
        if not (need_h or need_w):
            continue
        # d loss / d z = (1 - alpha)/τ · ∂kd/∂s + alpha · (softmax(z) - onehot(y)), over the scored tokens' count
        dz = _student_grad(o.kind, o.beta, logp, logq, logm, p, q, stats).mul_((1 - o.alpha) / o.temperature)
        del logp, logq, logm, p, q, t, s
        e.div_(sums[2].unsqueeze(-1)).scatter_add_(-1, idx, -inside.to(acc).unsqueeze(-1))
        dz.add_(e, alpha=o.alpha).mul_((vc / count).unsqueeze(-1))
        del e, z
        dz = dz.to(o.dtype)
        if need_h:
            grad_h[sl] = dz @ w
        if need_w:
            grad_w_real += (dz.t() @ hc).to(acc)
    kd, ce = kd_sum / count, ce_sum / count
    return (o.alpha * ce + (1 - o.alpha) * kd), kd, ce, grad_h, grad_w


class _DistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, th, tweight, targets, tp, spec):  # noqa: ANN001, ANN205
        loss, kd, ce, grad_h, grad_w = _terms_and_grads(h, weight, th, tweight, targets, tp, spec,
                                                        *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad, _kd, _ce):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def distill_loss(h: torch.Tensor, weight: torch.Tensor, teacher_h: torch.Tensor, teacher_weight: torch.Tensor,
                 targets: torch.Tensor, *, loss: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 alpha: float = 0.0, group: TPGroup | None = None, vocab_start: int = 0, real: int | None = None,
                 chunk: int = 512) -> DistillTerms:
    """The distillation loss (module text) of a student whose head input is `h` (..., hidden) and head weight
    shard `weight` (rows [vocab_start, vocab_start + real) of the vocabulary, then padding), against a teacher
    with head input `teacher_h` (..., teacher hidden) and its own weight shard of the same rows; `targets` (...)
    token ids of the full vocabulary, -100 left out. group: the tp group the vocabulary is split over (None: whole
    here); h and teacher_h are the full (all-gathered) inputs of the heads. Under autocast the GEMMs run in the
    autocast dtype, as `F.linear` would; the statistics in fp32 (fp64 inputs: fp64). Differentiable with respect
    to h and weight."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if temperature <= 0 or not 0.0 <= alpha <= 1.0 or (loss == "jsd" and not 0.0 < beta < 1.0):
        raise ValueError(f"need temperature > 0 ({temperature}), alpha in [0, 1] ({alpha}), beta in (0, 1) for jsd "
                         f"({beta})")
    tp = group if group is not None else TPGroup(None, 1, 0)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    h2, th2, y = h.reshape(-1, h.shape[-1]), teacher_h.reshape(-1, teacher_h.shape[-1]), targets.reshape(-1)
    if not h2.shape[0] == th2.shape[0] == y.shape[0]:
        raise ValueError(f"student {tuple(h.shape)}, teacher {tuple(teacher_h.shape)} and targets "
                         f"{tuple(targets.shape)} must have the same positions")
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"the student's head shard has {weight.shape[0]} rows, the teacher's {teacher_weight.shape[0]}: "
                         "both must split the same vocabulary")
    spec = _Spec(loss, beta, temperature, alpha, vocab_start, weight.shape[0] if real is None else real, chunk, dtype)
    with torch.autocast(dev, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return DistillTerms(*_DistillLoss.apply(h2, weight, th2.detach(), teacher_weight.detach(), y, tp, spec))
        return DistillTerms(*_terms_and_grads(h2, weight, th2, teacher_weight, y, tp, spec, False, False)[:3])
