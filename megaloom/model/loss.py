"""Chunked linear + cross entropy: the loss of `h @ Wᵀ` without the full logits in memory.

The plain head computes logits (N, V) in 16 bits, casts them to fp32 and keeps the fp32 softmax for
backward: for GPT 1.3B at micro-batch 8 (N = 16,384, V = 50,304) that is 1.6 GB + 3.3 GB + 3.3 GB, more
than a whole layer's activations. Here rows are processed `chunk` at a time: each chunk's logits are
formed, reduced to the loss, and turned at once into that chunk's gradients (the loss is a scalar,
so its gradient is known up to the incoming scalar, which backward multiplies in). What stays for
backward is dL/dh (N, h) and dL/dW (V, h), never an (N, V) tensor; the transient is one chunk's logits.
This is the approach of Liger Kernel's fused linear cross entropy and of Wijmans et al. 2024 ("Cut Your
Losses in Large-Vocabulary Language Models"), written with plain PyTorch ops.

Numerics follow the plain path step for step: logits rounded to the autocast dtype, then fp32
log-softmax; the gradient of the logits rounded to the autocast dtype before the two GEMMs. The only
difference is that dL/dW is summed over chunks in fp32 (the plain path rounds the whole sum once to
16 bits), so in fp32 the two agree to rounding and in bf16 this one is slightly more accurate.

`reduction="none"` (no gradient) returns each token's loss instead of the mean: the same numbers before
they are summed, which evaluation (megaloom/eval) scores requests with.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets equal to this are left out of the mean, as in F.cross_entropy


def _loss_and_grads(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, dtype: torch.dtype,
                    need_h: bool, need_w: bool, per_token: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss, and the gradients of the mean loss that are asked for, chunk by chunk; `per_token`
    (N,) fp32, when given, receives each row's loss (0 where the target is ignored)."""
    w = weight.to(dtype)
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1).to(torch.float32)  # a tensor: no host sync
    loss = torch.zeros((), device=h.device, dtype=torch.float32)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    for start in range(0, h.shape[0], chunk):
        rows = slice(start, start + chunk)
        hc, yc, vc = h[rows].to(dtype), targets[rows], valid[rows]
        z = (hc @ w.t()).float()  # this chunk's logits, rounded like the plain head's
        lse = torch.logsumexp(z, dim=-1)
        idx = yc.clamp(min=0).unsqueeze(-1)
        rows_loss = (lse - z.gather(-1, idx).squeeze(-1)) * vc
        if per_token is not None:
            per_token[rows] = rows_loss
        loss += rows_loss.sum()
        if need_h or need_w:
            # d(mean CE)/dz = (softmax(z) - onehot(y)) / count, zero for ignored rows; in place on z
            z.sub_(lse.unsqueeze(-1)).exp_()
            z.scatter_add_(-1, idx, torch.full_like(idx, -1.0, dtype=z.dtype))
            z.mul_((vc / count).unsqueeze(-1))
            dz = z.to(dtype)
            del z
            if need_h:
                grad_h[rows] = dz @ w
            if need_w:
                grad_w += (dz.t() @ hc).float()
    return loss / count, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        loss, grad_h, grad_w = _loss_and_grads(h, weight, targets, chunk, dtype, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 2048, reduction: str = "mean") -> torch.Tensor:
    """Mean cross entropy of logits h @ weightᵀ against `targets` (fp32 log-softmax), computed `chunk`
    rows at a time. h: (..., hidden), weight: (V, hidden), targets: (...) token ids (-100 = ignore).
    Under autocast the GEMMs run in the autocast dtype, as `F.linear` would. `reduction="none"`: each
    token's loss, shaped like `targets`, 0 where ignored; no gradient."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    h2, y = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    with torch.autocast(dev, enabled=False):  # dtypes are handled explicitly inside
        if reduction == "none":
            if torch.is_grad_enabled():
                raise RuntimeError("reduction='none' computes no gradient; call it under torch.no_grad()")
            out = torch.zeros(y.numel(), device=y.device, dtype=torch.float32)
            _loss_and_grads(h2, weight, y, chunk, dtype, False, False, out)
            return out.view(targets.shape)
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h2, weight, y, chunk, dtype)
        return _loss_and_grads(h2, weight, y, chunk, dtype, False, False)[0]

