"""train.objective = "reward": a reward model trained on preference pairs (Ouyang et al. 2022, §3.5).

The model is the language model with a scalar head: `score` (a bias-free linear map hidden -> 1, on the
last pipeline stage, replicated over tensor-parallel ranks) read at each row's last token of the
conversation (its final assistant token: the end-of-turn token the chat template closes the response
with), as Hugging Face's sequence-classification models read the last non-padding token. The language-model
head is not used. The loss is `preference.reward_loss`: the Bradley-Terry -log σ(r_w - r_l - m) with the
pair's margin m when the records give one (a "margin" field, TRL's convention), plus
`reward.center_coefficient`·mean((r_w + r_l)²) (TRL's `center_rewards_coefficient`). Metrics `accuracy`
(the fraction of pairs scored the right way round) and `margin` (mean r_w - r_l), and `val_accuracy`,
`val_margin` with each validation.

The score head is initialised from `train.seed` (normal, std 1/sqrt(hidden + 1), as transformers' score
layers of sequence classification are), so the same seed gives the same head in every layout; it is saved
with the model (`score.weight`) and is not read from a pretrained model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from megaloom.align.pairs import PairObjective
from megaloom.align.preference import reward_loss
from megaloom.data.sft_loader import IGNORE_INDEX
from megaloom.parallel.comm import TPGroup, sum_over_tp
from megaloom.train.objective import Micro


class RewardObjective(PairObjective):
    """Preference pairs -> a scalar score per response, trained with the Bradley-Terry loss."""

    name = "reward"
    metric_names = ("accuracy", "margin")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._margins: dict[str, torch.Tensor | None] = {}

    def describe(self) -> str:
        c = self.cfg.reward.center_coefficient
        return f"; reward model{self.pairs_clause()}{f', centring {c}' if c else ''}"

    new_parameters = ("score.",)

    def adapt_model(self, chunk: nn.Module, tp: TPGroup | None) -> None:
        """The scalar head on the model's last stage; the language-model head, unused, is frozen."""
        if not getattr(chunk, "last", False):
            return
        if chunk.head.weight is not None:
            chunk.head.weight.requires_grad_(False)
        hidden = self.cfg.model.hidden
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 7919)  # its own stream: the base is unchanged
        weight = torch.randn(1, hidden, generator=gen) / math.sqrt(hidden + 1)
        device = next(chunk.parameters()).device
        chunk.score = nn.Linear(hidden, 1, bias=False, device=device)
        with torch.no_grad():
            chunk.score.weight.copy_(weight)

    def prepare(self, batch: Micro, split: str) -> Micro:
        """(inputs, targets, pair ids) -> (inputs, last-token position, [margin, valid]) per row."""
        x, y, ids = batch
        position = last_token_positions(y)
        if split not in self._margins:
            self._margins[split] = self.margins(split, x.device)
        margins = self._margins[split]
        margin = self.per_pair(margins, ids) if margins is not None else torch.zeros(len(ids), device=x.device)
        return x, position, torch.stack([margin.float(), self.valid(ids)], dim=1)

    def call(self, model: nn.Module, inputs: torch.Tensor, micro: Micro, last: bool = True, **kwargs) -> torch.Tensor:
        if not last:
            return model(inputs, **kwargs)
        _, position, extra = micro
        margin, valid = extra[:, 0], extra[:, 1]
        center = self.cfg.reward.center_coefficient or None
        score = model.score

        def loss_of(head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
            scores = row_scores(score, head, h, position + prepended)
            keep = valid[0::2] > 0
            # a pair without a margin has 0: -log σ(r_w - r_l - 0) is the plain loss
            loss, metrics = reward_loss(scores[0::2][keep], scores[1::2][keep], margin[0::2][keep], center)
            self.record(**metrics)
            return loss

        return model(inputs, head_fn=loss_of, **kwargs)


def row_scores(score: nn.Module, head: nn.Module, h: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The scalar head on each row's final hidden state at `where` (B,), from the last stage's h: whole on
    every tensor-parallel rank, or under sequence parallelism each rank's slice of the sequence, where the
    rank holding a row's position scores it and the scores are summed over the group."""
    tp = getattr(head, "tp", None)
    rows = torch.arange(h.shape[0], device=h.device)
    if tp is not None and tp.sequence_parallel and tp.size > 1:
        local = where - tp.rank * h.shape[1]
        inside = (local >= 0) & (local < h.shape[1])
        picked = h[rows, local.clamp(0, h.shape[1] - 1)].float() * inside.unsqueeze(-1)
        return sum_over_tp(score(picked).squeeze(-1), tp)
    return score(h[rows, where].float()).squeeze(-1)


def last_token_positions(y: torch.Tensor) -> torch.Tensor:
    """Each row's position of the token after its last scored target (its response's last token; the last
    position when the row is cut off), from targets (B, T) with -100 outside the response."""
    seq = y.shape[1]
    scored = y != IGNORE_INDEX
    last_target = torch.where(scored.any(1), seq - 1 - scored.flip(1).int().argmax(1), 0)
    return (last_target + 1).clamp(max=seq - 1)
