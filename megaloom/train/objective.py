"""What a run trains for: its data, how one micro-batch becomes a loss, and what else it reports.

An objective is a small object (DESIGN principle 6). The loop, the parallel engine, checkpoints, resume
and faults (megaloom/train/trainer.py) are shared by all of them; an objective only says

- which datasets the prepared corpus holds and how a global batch is drawn (`open`, `eval_batches`),
- how a model, or the last pipeline stage, turns the model input of a micro-batch into its mean loss
  (`call`; the pipeline runner calls it on every stage, so one definition serves every (t, p, d, ZeRO)),
- which scalar metrics besides the loss each micro-batch produces (`metric_names`, `take_metrics`):
  they are recorded on the rank that computes the loss and reduced over the grid like the loss.

Pretraining (`lm`) and supervised fine-tuning (`sft`) are defined here, since their data sits below
the training loop. Objectives of higher layers (alignment: reward, DPO; distillation) subclass
`Objective` and are handed to the `Trainer` by the command line (`objective=`), as the pretrained
weights are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from megaloom.config import Config, ConfigError
from megaloom.data import BatchLoader, TokenDataset
from megaloom.data.loader import eval_batches
from megaloom.data.prepare import CorpusInfo
from megaloom.data.sft_loader import SFTBatchLoader, SFTDataset, sft_eval_batches
from megaloom.parallel.grid import ProcessGrid
from megaloom.parallel.pipeline import next_token_call

Micro = tuple[torch.Tensor, ...]


class Objective:
    """Next-token prediction on every token of the corpus (pretraining); the base of every objective."""

    name = "lm"
    metric_names: tuple[str, ...] = ()  # reported per metrics row beside `loss`, in this order

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._sums: dict[str, torch.Tensor] = {}
        self._counts = 0
        self.train_data: Any = None
        self.val_data: Any = None
        self.loader: Any = None

    # ------------------------------------------------------------------ data

    def check(self, corpus: CorpusInfo) -> None:
        """Stop before any work when the prepared data cannot serve this objective."""
        seq = self.cfg.model.seq_len
        if corpus.val_tokens < seq + 1:
            raise ConfigError(f"the validation split of {corpus.directory} has {corpus.val_tokens} tokens, fewer than "
                              f"model.seq_len + 1 = {seq + 1}; raise data.val_fraction or add data")

    def open(self, corpus: CorpusInfo, grid: ProcessGrid, pin_memory: bool) -> None:
        """The datasets and this rank's loader: every data-parallel replica reads its slice of the same
        global batch."""
        m, t = self.cfg.model, self.cfg.train
        self.train_data, self.val_data = TokenDataset(corpus.directory, "train"), TokenDataset(corpus.directory, "val")
        self.loader = BatchLoader(self.train_data, m.seq_len, t.global_batch, seed=t.seed, dp_rank=grid.dp_rank,
                                  dp_size=grid.dp, pin_memory=pin_memory)

    def eval_batches(self) -> list[Micro]:
        """The validation micro-batches, the same on every rank and at every evaluation."""
        t = self.cfg.train
        return eval_batches(self.val_data, self.cfg.model.seq_len, t.micro_batch, t.eval_batches)

    def describe(self) -> str:
        """A clause for the run's header line about the data (empty: nothing to add)."""
        return ""

    # ------------------------------------------------------------------ loss

    def call(self, model: nn.Module, inputs: torch.Tensor, micro: Micro, last: bool = True, **kwargs) -> torch.Tensor:
        """What `model` (the whole model, or one pipeline chunk: `last` says whether it ends the model)
        returns for the micro-batch `micro`, given its input (token ids on the first stage, the previous
        stage's hidden states on the others): the mean loss on the last stage, hidden states elsewhere."""
        return next_token_call(model, inputs, micro, last, **kwargs)

    def micro_loss(self, model: nn.Module, micro: Micro) -> torch.Tensor:
        """The mean loss of one micro-batch through the whole (not pipelined) model."""
        return self.call(model, micro[0], micro)

    # ------------------------------------------------------------------ metrics

    def record(self, **values: torch.Tensor) -> None:
        """Add one micro-batch's metrics (means over the micro-batch), detached, on the loss's rank."""
        for name, v in values.items():
            v = v.detach().float()
            self._sums[name] = self._sums[name] + v if name in self._sums else v
        self._counts += 1 if values else 0

    def take_metrics(self, device: torch.device) -> torch.Tensor:
        """The mean of each metric over the micro-batches recorded since the last call, in the order of
        `metric_names` (zeros on ranks that computed no loss); then starts over."""
        n = max(self._counts, 1)
        out = torch.stack([self._sums.get(k, torch.zeros((), device=device)).to(device) / n
                           for k in self.metric_names]) if self.metric_names else torch.zeros(0, device=device)
        self._sums, self._counts = {}, 0
        return out


class SFTObjective(Objective):
    """Supervised fine-tuning: conversations, padded or packed, the loss on the assistant's tokens (targets
    of -100 elsewhere); packed rows carry document ids (docs/finetune.md)."""

    name = "sft"

    def check(self, corpus: CorpusInfo) -> None:
        if corpus.val_docs == 0:
            raise ConfigError(f"the validation split of {corpus.directory} holds no conversation; raise "
                              "data.val_fraction or add data")

    def open(self, corpus: CorpusInfo, grid: ProcessGrid, pin_memory: bool) -> None:
        m, t = self.cfg.model, self.cfg.train
        self.train_data, self.val_data = SFTDataset(corpus.directory, "train"), SFTDataset(corpus.directory, "val")
        self.loader = SFTBatchLoader(self.train_data, m.seq_len, t.global_batch, seed=t.seed,
                                     packing=self.cfg.data.packing, dp_rank=grid.dp_rank, dp_size=grid.dp,
                                     pin_memory=pin_memory)

    def eval_batches(self) -> list[Micro]:
        t = self.cfg.train
        return sft_eval_batches(self.val_data, self.cfg.model.seq_len, t.micro_batch, t.eval_batches,
                                self.cfg.data.packing)

    def describe(self) -> str:
        """Conversations, how they sit in rows, how many are cut, what the loss counts."""
        d, seq, loader = self.cfg.data, self.cfg.model.seq_len, self.loader
        cut = int((loader.dataset.bounds[:, 1] - loader.dataset.bounds[:, 0] > seq + 1).sum())
        rows = f"packed {loader.num_docs / max(1, len(loader.rows)):.1f} per row" if d.packing else "one per row"
        return (f"; SFT: {loader.num_docs:,} train conversations, {rows}{f', {cut} cut to {seq + 1} tokens' if cut else ''}"
                f", loss on {'every token' if d.train_on_prompt else 'assistant tokens'}")


BUILT_IN: dict[str, type[Objective]] = {"lm": Objective, "sft": SFTObjective}


def builtin_objective(cfg: Config, known: Sequence[str] = ()) -> Objective:
    """The objective of `train.objective` when it is defined by the training layer itself (lm, sft)."""
    name = cfg.train.objective
    if name not in BUILT_IN:
        raise ConfigError(f"train.objective = \"{name}\" is defined above the training loop; pass its objective to "
                          "the Trainer (megaloom train does)")
    return BUILT_IN[name](cfg)
