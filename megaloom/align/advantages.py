"""Advantage estimators of PPO and GRPO, and the masked statistics they use.

Tensors are (B, T) over response tokens, with a `mask` (B, T) true on the tokens the policy generated (false on
padding, and on any tokens inside a response it did not generate, such as a tool's output). Means over masked
tokens divide by the count clamped to 1, so an empty mask gives 0 rather than NaN, and nothing syncs with the host.
"""

from __future__ import annotations

from typing import Literal

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the true entries of `mask` (all of them when None), over `dim` or everything."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim)
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the true entries of `mask`, with Bessel's correction n/(n-1) when `unbiased`
    (TRL's and torchtune's masked_var)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = x.new_tensor(x.numel()) if mask is None else mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance); with `shift_mean=False` the mean is
    added back (whitening the scale only). Masked-out entries are set to 0. TRL's `masked_whiten`; torchtune's
    `whiten` names the flag the other way round (its shift_mean=True adds the mean back)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16): advantages and returns (B, T).

    δ_t = r_t + γ·V(s_{t+1}) - V(s_t),  A_t = δ_t + γλ·A_{t+1},  returns R_t = A_t + V(s_t),
    with V = 0 after a response's last token (the episode ends there). Masked-out tokens are skipped: t+1 means
    the next *masked-in* token, so a response with holes is the same as the response without them, and a
    right-padded batch gives what the unmasked recursion gives on the unpadded responses. Advantages and
    returns are 0 where the mask is false. No whitening here: see `masked_whiten`."""
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must have the same shape")
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    values = values.detach()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    return advantages, (advantages + values) * mask


GroupScale = Literal["group", "batch", "none"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: GroupScale = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantages (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision):
    Â_i = (r_i - mean(r_group)) / (std(r_group) + eps) for the `group_size` consecutive samples of a prompt.

    rewards (N,), N a multiple of group_size, grouped as [prompt 0's samples, prompt 1's, ...]. `scale` as TRL's
    GRPOConfig.scale_rewards: "group" divides by each group's std, "batch" by the std of all N rewards (Lite PPO,
    arXiv 2508.08221), "none" only centres (Dr. GRPO, Liu et al. 2025). Stds are unbiased, eps = 1e-4 as TRL's."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none'; got {scale!r}")
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards ({tuple(rewards.shape)}) must be one value per sample, a whole number of groups "
                         f"of group_size ({group_size})")
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return advantages
    if scale == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1) if group_size > 1 else None
    else:
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else None
    if std is None:  # one sample: no spread to divide by (its centred reward is 0 in "group" mode)
        std = torch.zeros_like(rewards)
    return advantages / (std + eps)
