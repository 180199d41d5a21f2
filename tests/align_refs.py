"""The independent implementations the alignment losses are checked against: TRL's and torchtune's own code, called
on the tensors the tests make.

TRL 1.16 keeps most of its losses inside trainer methods; those are called unbound, with a stub `self` that carries
only the attributes the method reads (its config values, a no-op accelerator for one process, a metrics dict) and a
stub model whose outputs are the given tensors, so the method's own arithmetic runs unchanged.

torchtune's package `__init__` imports torchao and its dataset builders (about 9 s, and it fails on torchao
releases after 0.13); its rlhf functions are pure torch, so `torchtune()` executes the installed files
`rlhf/rewards.py`, `rlhf/loss/ppo.py` and `rlhf/loss/dpo.py` as they are, under private module names.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections import defaultdict
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the CPO trainer lives in trl.experimental, and says so

from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.reward_trainer import RewardTrainer


class OneProcess:
    """What the trainer methods ask of accelerate's Accelerator, for a single process."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x


def _metrics() -> defaultdict:
    return defaultdict(lambda: defaultdict(list))


def trl_dpo(per_token: torch.Tensor, mask: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
            loss_type: str, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's DPOTrainer._compute_loss on per-token policy log-probs (2B, T) of [chosen; rejected] (0 off `mask`),
    with precomputed reference sequence log-probs (B,)."""
    rows, t = per_token.shape
    self = SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=OneProcess(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=_metrics(), _total_train_tokens=0, _tp_size=1)
    zeros = torch.zeros(rows, t)

    def model(**kwargs: object) -> SimpleNamespace:  # the fused head's outputs: log p of each label
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)  # labels are shifted
    inputs = {"input_ids": torch.zeros(rows, t + 1, dtype=torch.long), "attention_mask": torch.ones(rows, t + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(self, model, inputs, False)
    return loss, {k: v[-1] for k, v in self._metrics["eval"].items()}


def trl_cpo(chosen: torch.Tensor, rejected: torch.Tensor, loss_type: str, beta: float, label_smoothing: float = 0.0,
            simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's CPOTrainer.cpo_loss: per-pair losses, chosen and rejected rewards."""
    self = SimpleNamespace(alpha=0.0, accelerator=OneProcess(), loss_type=loss_type, beta=beta,
                           label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    return CPOTrainer.cpo_loss(self, chosen, rejected)


trl_batch_logps = CPOTrainer.get_batch_logps  # a static method: (logits, labels, average_log_prob)


def trl_reward(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None,
               center: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's RewardTrainer.compute_loss on a model whose scalar outputs are [chosen; rejected]."""
    self = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=OneProcess(), _metrics=_metrics(),
                           args=SimpleNamespace(center_rewards_coefficient=center), _total_train_tokens=0, _tp_size=1)

    def model(**kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    inputs = {"attention_mask": torch.ones(2 * chosen.shape[0], 4)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(self, model, inputs)
    return loss, {k: v[-1] for k, v in self._metrics["eval"].items()}


def trl_grpo(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
             mask: torch.Tensor, loss_type: str, beta: float, eps_low: float,
             eps_high: float) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's GRPOTrainer._compute_loss, with the model's per-token log-probs given."""
    entropies = torch.zeros_like(logps)
    self = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=OneProcess(), _metrics=_metrics(), args=SimpleNamespace(use_bias_correction_kl=False, delta=None))
    b = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old_logps}
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    loss = GRPOTrainer._compute_loss(self, None, inputs)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


def _exec_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def torchtune() -> SimpleNamespace:
    """torchtune 0.6.1's rlhf functions (rewards.py) and losses (PPOLoss, DPOLoss, RSOLoss), from its installed
    files, without running its package __init__ (see the module text)."""
    root = Path(importlib.util.find_spec("torchtune").origin).parent  # finds the package without importing it
    rewards = _exec_file("_torchtune_rlhf_rewards", root / "rlhf" / "rewards.py")
    dpo = _exec_file("_torchtune_rlhf_dpo", root / "rlhf" / "loss" / "dpo.py")
    # ppo.py reads `rlhf.masked_mean` through `from torchtune import rlhf`: give it rewards.py's, for its import only
    saved = sys.modules.get("torchtune")
    sys.modules["torchtune"] = SimpleNamespace(rlhf=rewards)
    try:
        ppo = _exec_file("_torchtune_rlhf_ppo", root / "rlhf" / "loss" / "ppo.py")
    finally:
        if saved is None:
            del sys.modules["torchtune"]
        else:
            sys.modules["torchtune"] = saved
    return SimpleNamespace(rewards=rewards, PPOLoss=ppo.PPOLoss, DPOLoss=dpo.DPOLoss, RSOLoss=dpo.RSOLoss)
