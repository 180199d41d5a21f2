"""Policy-gradient losses: PPO's clipped surrogate and clipped value loss, and GRPO's loss, with their metrics.

Inputs are (B, T) per response token with a `mask` (B, T) of the tokens the policy generated; advantages are per
token (B, T), or per sequence (B,) and broadcast over the tokens (GRPO). Per-token losses are reduced by
`aggregation`: "token" divides the masked sum by the number of masked tokens of the batch (PPO as TRL and
torchtune write it; GRPO's "bnpo", and DAPO's token-level loss, Yu et al. 2025, within the batch given),
"sequence" averages each sequence over its tokens and then the sequences (GRPO as DeepSeekMath eq. 3 writes it).
"""

from __future__ import annotations

from typing import Literal

import torch

from megaloom.align.advantages import masked_mean
from megaloom.align.kl import kl_estimate

Aggregation = Literal["token", "sequence"]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor | None, aggregation: Aggregation = "token") -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar over the masked tokens (see the module text)."""
    if aggregation == "token":
        return masked_mean(per_token, mask)
    if aggregation == "sequence":
        return masked_mean(per_token, mask, dim=-1).mean()
    raise ValueError(f"aggregation must be 'token' or 'sequence'; got {aggregation!r}")


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip: float = 0.2,
                      clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token clipped surrogate, as a loss (Schulman et al. 2017, eq. 7):
    max(-A·r, -A·clip(r, 1 - ε, 1 + ε_high)) with r = exp(log π - log π_old), ε_high = `clip_high` or ε (DAPO's
    clip-higher when larger, Yu et al. 2025). Returns the loss and where the clip binds (the clipped term is the
    larger), both (B, T)."""
    if advantages.dim() == logps.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + (clip if clip_high is None else clip_high))
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor | None = None, clip: float = 0.2, clip_high: float | None = None,
                    aggregation: Aggregation = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss (see `clipped_surrogate`) and its metrics:

    - `clip_fraction`: the fraction of tokens where the clip binds (torchtune's PPOLoss clipfrac);
    - `approx_kl`: mean ½(log π - log π_old)², the k2 estimate of KL(π_old || π) that OpenAI baselines' ppo2 and
      TRL's PPO trainer log to watch how far an update moved the policy."""
    per_token, clipped = clipped_surrogate(logps, old_logps, advantages, clip, clip_high)
    log_ratio = (logps - old_logps).detach()
    return aggregate(per_token, mask, aggregation), {
        "clip_fraction": masked_mean(clipped.to(per_token.dtype), mask),
        "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
    }


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None,
                   clip: float | None = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss ½·max((V - R)², (clip(V, V_old - ε, V_old + ε) - R)²), the mean over masked tokens
    (OpenAI baselines ppo2; TRL's and torchtune's PPO), unclipped when `clip` is None; and `value_clip_fraction`,
    the fraction of tokens where the clipped term is the larger."""
    loss = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(loss, mask), {"value_clip_fraction": torch.zeros((), dtype=values.dtype)}
    clipped = (torch.clamp(values, old_values - clip, old_values + clip) - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(loss, clipped), mask), {
        "value_clip_fraction": masked_mean((clipped > loss).detach().to(values.dtype), mask),
    }


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None = None,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None, beta: float = 0.0,
              clip: float = 0.2, clip_high: float | None = None,
              aggregation: Aggregation = "sequence") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss (Shao et al. 2024, DeepSeekMath eq. 3): PPO's clipped surrogate with the group-normalised
    advantage of each sequence (B,) on all its tokens, plus β·k3 per token (eq. 4) toward the reference; β may be
    0, and then no reference is needed. `old_logps` None: one update per generation, π_old = π (detached), as TRL
    does. Metrics: `clip_fraction`, and `kl` (the mean k3) when `ref_logps` is given."""
    if beta and ref_logps is None:
        raise ValueError(f"grpo beta is {beta}: the KL term needs the reference's log-probabilities (ref_logps)")
    old_logps = logps.detach() if old_logps is None else old_logps
    per_token, clipped = clipped_surrogate(logps, old_logps, advantages, clip, clip_high)
    metrics = {"clip_fraction": masked_mean(clipped.to(per_token.dtype), mask)}
    if ref_logps is not None:
        kl = kl_estimate(logps, ref_logps, "k3")
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta:
            per_token = per_token + beta * kl
    return aggregate(per_token, mask, aggregation), metrics
