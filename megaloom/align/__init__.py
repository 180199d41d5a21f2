"""Alignment: reward models, DPO and its relatives, PPO and GRPO (issue 17).

This package sits on top of train (DESIGN principle 6). Its losses and estimators are small pure functions, each
checked against TRL or torchtune on the same tensors: sequence log-probabilities and entropies over a
vocab-parallel head (`logprobs`), preference losses (`preference`), KL estimators and controllers (`kl`), GAE,
whitening and GRPO's group advantages (`advantages`), and the PPO / GRPO policy and value losses (`policy`).
docs/alignment.md lists them with their equations and sources.
"""

from megaloom.align.advantages import gae, group_advantages, masked_mean, masked_var, masked_whiten
from megaloom.align.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_penalized_rewards
from megaloom.align.logprobs import (
    SequenceLogprobs,
    sequence_logprobs,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)
from megaloom.align.policy import aggregate, clipped_surrogate, grpo_loss, ppo_policy_loss, ppo_value_loss
from megaloom.align.preference import DPO_LOSSES, dpo_loss, reward_loss

__all__ = [
    "DPO_LOSSES", "AdaptiveKLController", "FixedKLController", "SequenceLogprobs", "aggregate", "clipped_surrogate",
    "dpo_loss", "gae", "group_advantages", "grpo_loss", "kl_estimate", "kl_penalized_rewards", "masked_mean",
    "masked_var", "masked_whiten", "ppo_policy_loss", "ppo_value_loss", "reward_loss", "sequence_logprobs",
    "token_entropy", "token_logprobs", "token_logprobs_and_entropy",
]
