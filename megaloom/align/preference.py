"""Preference losses on sequence log-probabilities: DPO and its relatives, and the reward model's Bradley-Terry loss.

Every function takes per-sequence values for a batch of pairs (chosen, rejected), returns the batch-mean loss and
its metrics (detached scalars, means over the batch), and is checked against TRL / torchtune on the same tensors
(tests/unit/test_align_preference.py). Sequence log-probabilities are sums over the response tokens
(`megaloom.align.logprobs.sequence_logprobs`); IPO and SimPO also need each response's number of tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge", "simpo"]
DPO_LOSSES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "simpo")


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - ε)·log σ(z) - ε·log σ(-z): the logistic loss when a label is flipped with probability ε (cDPO)."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def _check(loss: str, beta: float, label_smoothing: float, ref: bool, lengths: bool) -> None:
    if loss not in DPO_LOSSES:
        raise ValueError(f"dpo loss must be one of {', '.join(DPO_LOSSES)}; got {loss!r}")
    if beta <= 0:
        raise ValueError(f"dpo beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss not in ("sigmoid", "simpo"):
        raise ValueError(f"label_smoothing ({label_smoothing}) applies to the 'sigmoid' (cDPO) and 'simpo' losses, "
                         f"not {loss!r}; set it to 0")
    if loss == "simpo" and ref:
        raise ValueError("the 'simpo' loss uses no reference model: pass no reference log-probabilities")
    if loss != "simpo" and not ref:
        raise ValueError(f"the {loss!r} loss needs the reference model's log-probabilities")
    if loss in ("ipo", "simpo") and not lengths:
        raise ValueError(f"the {loss!r} loss is length-normalised: pass chosen_tokens and rejected_tokens")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None = None,
             ref_rejected_logps: torch.Tensor | None = None, *, loss: DPOLossType = "sigmoid", beta: float = 0.1,
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean preference loss of a batch of pairs, and `rewards/chosen`, `rewards/rejected`, `rewards/margin`,
    `rewards/accuracy`.

    Inputs (B,): the policy's and the reference's summed log-probabilities of the chosen and rejected responses;
    `chosen_tokens`, `rejected_tokens` (B,) their lengths (for "ipo" and "simpo"). With the log-ratios
    ρ_w = log π(y_w) - log π_ref(y_w), ρ_l likewise, and Δ = ρ_w - ρ_l:

    - "sigmoid": -log σ(βΔ) (Rafailov et al. 2023, eq. 7); with label_smoothing ε the conservative cDPO
      -(1-ε)·log σ(βΔ) - ε·log σ(-βΔ) (Mitchell 2023), as torchtune's DPOLoss and TRL's CPO trainer.
    - "ipo": (ρ_w/|y_w| - ρ_l/|y_l| - 1/(2β))² (Azar et al. 2023, eq. 17), per-token log-ratios as TRL's
      DPOTrainer (β is the paper's τ).
    - "hinge": max(0, 1 - βΔ): SLiC's hinge (Zhao et al. 2023) on DPO's log-ratios, as RSO (Liu et al. 2023)
      uses it; TRL's DPOTrainer and torchtune's RSOLoss.
    - "simpo": -log σ(β·log π(y_w)/|y_w| - β·log π(y_l)/|y_l| - γ), no reference (Meng et al. 2024, eq. 6), with
      γ = `simpo_gamma`; label_smoothing as for "sigmoid" (TRL's CPO trainer, loss_type="simpo").

    Rewards are β·ρ (β times the length-normalised log-probability for SimPO), as TRL logs them; the accuracy is
    the fraction of pairs whose chosen reward is the larger."""
    ref = ref_chosen_logps is not None and ref_rejected_logps is not None
    _check(loss, beta, label_smoothing, ref, chosen_tokens is not None and rejected_tokens is not None)
    if loss == "simpo":
        chosen = chosen_logps / chosen_tokens.clamp(min=1)
        rejected = rejected_logps / rejected_tokens.clamp(min=1)
        per_pair = _smoothed_logistic(beta * (chosen - rejected) - simpo_gamma, label_smoothing)
    else:
        chosen = chosen_logps - ref_chosen_logps
        rejected = rejected_logps - ref_rejected_logps
        if loss == "sigmoid":
            per_pair = _smoothed_logistic(beta * (chosen - rejected), label_smoothing)
        elif loss == "hinge":
            per_pair = torch.relu(1 - beta * (chosen - rejected))
        else:  # ipo
            delta = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
            per_pair = (delta - 1 / (2 * beta)) ** 2
    chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
    }
    return per_pair.mean(), metrics


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a reward model's scalar scores (B,) for chosen and rejected responses, and its
    `accuracy` (chosen scored higher) and mean `margin` (chosen - rejected).

    -log σ(r_w - r_l - m) (Ouyang et al. 2022, eq. 1; the margin m of Llama 2, Touvron et al. 2023, eq. 2), plus
    c·mean((r_w + r_l)²), which pulls the rewards' mean to 0 (Eisenstein et al. 2023, eq. 2), with
    c = `center_rewards_coefficient`: TRL's RewardTrainer.compute_loss."""
    diff = chosen - rejected
    loss = -F.logsigmoid(diff if margin is None else diff - margin).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    diff = diff.detach()
    return loss, {"accuracy": (diff > 0).to(diff.dtype).mean(), "margin": diff.mean()}
