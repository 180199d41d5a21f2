"""Vocab-parallel linear + cross entropy, chunked: the loss of h @ Wᵀ when each tp rank holds V/t rows
of W, without the logits ever existing in full, and without even one rank's N x V/t logits in fp32.

Megatron-LM (reference/004, §2.3) fuses the head GEMM with the cross entropy so the logits are never
gathered: each rank forms its V/t columns, and the softmax's max, sum of exponentials and the target's
logit are all-reduced over the tp group. Here that runs `chunk` rows at a time, exactly as the
single-device loss of `megaloom/model/loss.py` does: per chunk its logits (rounded to the autocast
dtype, then fp32), the statistics, the loss, and at once its gradients with respect to h (a partial
sum over this rank's vocabulary rows, which the column-parallel `f` before the head all-reduces, or
reduce-scatters under sequence parallelism) and to the weight shard. Where t does not divide V, the
weight shard's rows past its `real` ones are padding (`megaloom/parallel/shard.py`): their logits are
never formed, so they take no part in the softmax and their gradient stays zero. Targets equal to -100 are left out
of the mean, which divides by the number of the others (clamped to 1, no host sync), as
`F.cross_entropy` and the single-device loss do. `reduction="none"` (no gradient) returns each token's
loss instead, as the single-device loss does, for evaluation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaloom.parallel.comm import TPGroup, all_reduce_no_grad

IGNORE_INDEX = -100


def _loss_and_grads(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tp: TPGroup, start: int,
                    chunk: int, dtype: torch.dtype, need_h: bool, need_w: bool, real: int,
                    per_token: torch.Tensor | None = None):  # noqa: ANN202
    w = weight[:real].to(dtype)  # the vocabulary rows; the padding after them never forms a logit
    rows = w.shape[0]
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1).to(torch.float32)
    loss = torch.zeros((), device=h.device, dtype=torch.float32)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    grad_w_real = grad_w[:real] if need_w else None  # the padding rows' gradient stays zero
    for begin in range(0, h.shape[0], chunk):
        sl = slice(begin, begin + chunk)
        hc, vc = h[sl].to(dtype), valid[sl]
        local = targets[sl] - start
        inside = (local >= 0) & (local < rows) & vc
        idx = local.clamp(0, rows - 1).unsqueeze(-1)
        z = (hc @ w.t()).float()  # this chunk's logits over this rank's V/t rows
        zmax = z.max(dim=-1).values
        all_reduce_no_grad(zmax, tp, dist.ReduceOp.MAX)
        z.sub_(zmax.unsqueeze(-1))
        target = z.gather(-1, idx).squeeze(-1) * inside
        z.exp_()
        stats = torch.stack([z.sum(dim=-1), target])
        all_reduce_no_grad(stats, tp)  # one all-reduce for the sum of exponentials and the target logit
        sum_exp, target = stats[0], stats[1]
        rows_loss = (sum_exp.log() - target) * vc
        if per_token is not None:
            per_token[sl] = rows_loss
        loss += rows_loss.sum()
        if need_h or need_w:
            # d(mean CE)/dz = (softmax(z) - onehot(y)) / count on this rank's columns, 0 for ignored rows
            z.div_(sum_exp.unsqueeze(-1))
            z.scatter_add_(-1, idx, -inside.to(z.dtype).unsqueeze(-1))
            z.mul_((vc / count).unsqueeze(-1))
            dz = z.to(dtype)
            del z
            if need_h:
                grad_h[sl] = dz @ w
            if need_w:
                grad_w_real += (dz.t() @ hc).float()
    return loss / count, grad_h, grad_w


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, tp, start, chunk, dtype, real):  # noqa: ANN001, ANN205
        loss, grad_h, grad_w = _loss_and_grads(h, weight, targets, tp, start, chunk, dtype, *ctx.needs_input_grad[:2],
                                               real)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tp: TPGroup,
                                        start: int, chunk: int = 2048, reduction: str = "mean",
                                        real: int | None = None) -> torch.Tensor:
    """Mean cross entropy of h @ weightᵀ where `weight` holds vocabulary rows [start, start + real) then
    padding (`real` None: every row is real) and `h` (..., hidden) is the full (all-gathered) input of
    the head; targets (...) with -100 ignored.
    Under autocast the GEMMs run in the autocast dtype, as `F.linear` would. `reduction="none"`: each
    token's loss (the same on every tp rank), shaped like `targets`, 0 where ignored; no gradient."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    h2, y = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    real = weight.shape[0] if real is None else real
    with torch.autocast(dev, enabled=False):
        if reduction == "none":
            if torch.is_grad_enabled():
                raise RuntimeError("reduction='none' computes no gradient; call it under torch.no_grad()")
            out = torch.zeros(y.numel(), device=y.device, dtype=torch.float32)
            _loss_and_grads(h2, weight, y, tp, start, chunk, dtype, False, False, real, out)
            return out.view(targets.shape)
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _VocabParallelLinearCE.apply(h2, weight, y, tp, start, chunk, dtype, real)
        return _loss_and_grads(h2, weight, y, tp, start, chunk, dtype, False, False, real)[0]
