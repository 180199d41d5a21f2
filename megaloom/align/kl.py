"""The KL penalty of RLHF: per-token estimators of KL(π || π_ref), the KL-penalised per-token reward of PPO, and the
fixed and adaptive controllers of its coefficient.

With the per-token log-ratio ρ = log π(y_t) - log π_ref(y_t) of a token sampled from π, Schulman's estimators
("Approximating KL Divergence", 2020), named k1/k2/k3 as TRL's and torchtune's configs name them, are

    k1 = ρ                       unbiased, high variance, can be negative
    k2 = ρ² / 2                  biased, low variance (the gradient of E[k2] is that of the KL)
    k3 = exp(-ρ) - 1 + ρ         unbiased, low variance, never negative (GRPO's KL term, DeepSeekMath eq. 4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from the log-probabilities of the sampled tokens (see the module text)."""
    ratio = logps - ref_logps
    if estimator == "k1":
        return ratio
    if estimator == "k2":
        return 0.5 * ratio ** 2
    if estimator == "k3":
        return torch.expm1(-ratio) + ratio
    raise ValueError(f"KL estimator must be 'k1', 'k2' or 'k3'; got {estimator!r}")


def kl_penalized_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, kl_coef: float,
                         mask: torch.Tensor | None = None,
                         estimator: KLEstimator = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token reward (Ziegler et al. 2019, §2.2; Ouyang et al. 2022, eq. 2): -β·KL_t on every response token,
    plus the sequence's score (B,) on its last masked-in token. Returns (rewards, kl), both (B, T), 0 where `mask`
    is false. torchtune's `get_rewards_ppo` with k1."""
    kl = kl_estimate(logps, ref_logps, estimator).detach()
    if mask is None:
        mask = torch.ones_like(kl, dtype=torch.bool)
    mask = mask.bool()
    kl = kl * mask
    rewards = -kl_coef * kl
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = (mask * positions).argmax(dim=1, keepdim=True)  # the last true position (0 for an empty row)
    rewards.scatter_add_(1, last, (scores * mask.any(dim=1)).to(rewards.dtype).unsqueeze(1))
    return rewards, kl


@dataclass
class FixedKLController:
    """A constant KL coefficient β (TRL's FixedKLController)."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing changes."""


@dataclass
class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (§2.2, "we dynamically vary β"), as TRL's:

        e = clip(KL / target - 1, -0.2, 0.2),    β ← β·(1 + e·n_steps / horizon)

    after each batch of `n_steps` samples whose mean KL was `current_kl`; β grows while the policy drifts past
    the target KL and shrinks while it stays below, by at most 20%·n_steps/horizon a batch."""

    value: float
    target: float
    horizon: int

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0 or self.value < 0:
            raise ValueError(f"adaptive KL needs target > 0 ({self.target}), horizon > 0 ({self.horizon}) and an "
                             f"initial coefficient >= 0 ({self.value})")

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
