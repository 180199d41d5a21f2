"""What the objectives on preference pairs share (reward models, DPO): the corpus check, two rows per pair,
what the run's header says about the pairs, and the per-pair margins a corpus may carry.

A batch of pairs is (inputs, targets, pair ids) from `megaloom/data/sft_loader.py`: rows chosen, rejected,
chosen, ... and each row's pair index in its split (-1 for the pairs that fill up the last validation
micro-batch, which count nothing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from megaloom.config import ConfigError
from megaloom.data.prepare import CorpusInfo
from megaloom.train.objective import SFTObjective


class PairObjective(SFTObjective):
    """The base of the objectives that read {prompt, chosen, rejected} pairs."""

    rows = 2

    def check(self, corpus: CorpusInfo) -> None:
        super().check(corpus)
        if corpus.group != 2:
            raise ConfigError(f"train.objective = \"{self.name}\" reads preference pairs, but {corpus.directory} holds "
                              "single conversations; give {\"prompt\", \"chosen\", \"rejected\"} records")

    def pairs_clause(self) -> str:
        """How many training pairs, and how many responses model.seq_len cuts off entirely (a pair with
        such a response teaches nothing)."""
        data, cap = self.loader.dataset, self.cfg.model.seq_len + 1
        empty = sum(1 for start, end in data.bounds if not data.mask[start + 1:min(end, start + cap)].any())
        lost = f", {empty} responses cut off entirely by model.seq_len (raise it)" if empty else ""
        return f": {self.loader.num_docs // 2:,} train pairs{lost}"

    def margins(self, split: str, device: torch.device) -> torch.Tensor | None:
        """The corpus's per-pair margins of a split (its records' "margin" fields, 0 where absent), or None."""
        path = self.train_data.directory / f"{split}.margin.npy"
        return torch.from_numpy(np.load(path)).to(device) if path.is_file() else None

    @staticmethod
    def valid(ids: torch.Tensor) -> torch.Tensor:
        """1.0 on the rows of real pairs, 0.0 on the filling of the last validation micro-batch."""
        return torch.where(ids >= 0, 1.0, 0.0)

    @staticmethod
    def per_pair(values: torch.Tensor, ids: torch.Tensor) -> Any:
        """A row-wise lookup of a per-pair table (pairs,) by pair id: 0 on filling rows."""
        return torch.where(ids >= 0, values[ids.clamp(min=0)], 0.0)
