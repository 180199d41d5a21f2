"""The independent distillation losses megaloom's are checked against, run as installed: TRL 1.16's
`GKDTrainer.generalized_jsd_loss` (a static method: called as it is) and torchtune 0.6.1's `ForwardKLLoss` and
`ReverseKLLoss` (modules/loss/kd_losses.py, pure torch, executed from its installed file without the package
`__init__`, as tests/align_refs.py does for torchtune's rlhf files), plus the cross-entropy mix of torchtune's
knowledge-distillation recipes: (1 - kd_ratio)·CE + kd_ratio·KD, i.e. alpha = 1 - kd_ratio."""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tests.align_refs import _exec_file

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKD lives in trl.experimental, and says so


@cache
def torchtune_kd() -> SimpleNamespace:
    root = Path(importlib.util.find_spec("torchtune").origin).parent
    kd = _exec_file("_torchtune_kd_losses", root / "modules" / "loss" / "kd_losses.py")
    return SimpleNamespace(ForwardKLLoss=kd.ForwardKLLoss, ReverseKLLoss=kd.ReverseKLLoss)


def trl_jsd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, beta: float,
            temperature: float) -> torch.Tensor:
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)


TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}  # TRL's beta = 0 and 1 are the two KLs


def reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, loss: str, beta: float,
              temperature: float, alpha: float) -> torch.Tensor:
    """alpha·CE + (1 - alpha)·TRL's divergence of logits (B, T, V)."""
    kd = trl_jsd(student, teacher, labels, TRL_BETA.get(loss, beta), temperature)
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return alpha * ce + (1 - alpha) * kd
