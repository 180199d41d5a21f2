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

import math
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
    rows = 1  # sequences per item of train.global_batch and train.micro_batch (2: a preference pair)
    new_parameters: tuple[str, ...] = ()  # name prefixes of parameters the objective adds (not in model.pretrained)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
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

    def adapt_model(self, chunk: nn.Module, tp: Any) -> None:
        """Called on every model chunk as it is built, after parameter-efficient adapters and before ZeRO
        wrapping: where an objective adds parameters of its own (a reward model's scalar head)."""

    def start(self, trainer: Any) -> None:
        """Called once the trainer has set up the model and loaded a checkpoint, if any, before the first
        step: where an objective builds what it needs beside the trained model (a frozen reference)."""

    def state_dict(self) -> dict:
        """What the objective carries from step to step besides the loader (PPO's KL coefficient): saved in
        checkpoints, the same on every rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict`'s output."""

    def entries(self) -> dict:
        """This rank's pieces (`sharded_state.Sharded`) of tensors the objective trains beside the model (a
        separate PPO critic's weights and Adam moments), saved in checkpoints under the objective's own
        prefix; the objective reads them back itself in `start` (from `trainer.loaded_from`)."""
        return {}

    def side_models(self) -> dict[str, tuple[nn.Module, Any]]:
        """The models the objective holds beside the trained one (a frozen reference copy, a critic, a reward
        model): name -> (model, its optimizer or None), whose bytes metrics.jsonl's `memory` reports."""
        return {}

    def prepare(self, batch: Micro, split: str) -> Micro:
        """This rank's batch (of `split`, "train" or "val", on the device) before it is cut into
        micro-batches: where an objective adds what its loss reads besides the tokens (reference
        log-probabilities). Collective when it runs models: every rank calls it in the same order."""
        return batch

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

    def record(self, **values: torch.Tensor | float) -> None:
        """Add one value of each metric (a micro-batch's mean, or a batch's), on the rank that computes the
        loss (the last pipeline stage) only, so that the sum over the pipeline is the value."""
        for name, v in values.items():
            v = torch.as_tensor(v).detach().float()
            self._sums[name] = self._sums[name] + v if name in self._sums else v
            self._counts[name] = self._counts.get(name, 0) + 1

    def take_metrics(self, device: torch.device, owner: bool = True) -> torch.Tensor:
        """The mean of each metric over the values recorded since the last call, in the order of
        `metric_names`; then starts over. A metric with no value is 0 on ranks that do not compute the
        loss (`owner` False) and NaN on those that do, so that after the sum over the pipeline it reads
        "not measured in this interval" (a PPO step without a rollout has no KL)."""
        missing = torch.tensor(math.nan if owner else 0.0, device=device)
        out = torch.stack([self._sums[k].to(device) / self._counts[k] if k in self._sums else missing
                           for k in self.metric_names]) if self.metric_names else torch.zeros(0, device=device)
        self._sums, self._counts = {}, {}
        return out


class SFTObjective(Objective):
    """Supervised fine-tuning: conversations, padded or packed, the loss on the assistant's tokens (targets
    of -100 elsewhere); packed rows carry document ids (docs/finetuning.md)."""

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
