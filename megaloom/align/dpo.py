"""train.objective = "dpo": direct preference optimisation (and IPO, hinge, SimPO) on the parallel engine.

Data are preference pairs (`data.format = "preference"`, megaloom/data/sft.py): each pair's chosen and
rejected conversations are two rows of a micro-batch (chosen, rejected, chosen, ...), the targets -100
outside the response, so a row's summed log-probability is log π(response | prompt). A micro-batch of
`train.micro_batch` pairs is 2·micro_batch rows: the pipeline carries them as one micro-batch.

The last stage turns its final hidden states into per-token log-probabilities with the vocab-parallel,
chunked `token_logprobs` (the logits are never gathered nor formed whole), sums them per row and takes the
loss of `preference.dpo_loss`; its metrics (`rewards/chosen`, `rewards/rejected`, `rewards/margin`,
`rewards/accuracy`) are reduced over the grid like the loss. The reference's log-probabilities are an input
of the batch (`prepare`), from one of:

- the reference of megaloom/align/reference.py, run forward-only on each batch before the step: under
  LoRA, DoRA, (IA)^3 or Houlsby adapters the trained model with its adapters switched off (no second
  model), else a frozen copy of the starting weights on the same grid (no gradients, no optimizer state);
- `dpo.precompute_reference = true`: computed once before the first step with the model itself (which is
  the reference until it takes a step) over every pair of both splits, stored in the run directory
  (`reference_logps.pt`, read again on resume), so no second model is in memory while training;
- none for SimPO.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megaloom.align.logprobs import sequence_logprobs, token_logprobs
from megaloom.align.pairs import PairObjective
from megaloom.align.preference import dpo_loss
from megaloom.align.reference import Reference, build_reference
from megaloom.align.reference import describe as describe_reference
from megaloom.config import ConfigError
from megaloom.data.sft_loader import IGNORE_INDEX, sft_eval_batches
from megaloom.parallel.comm import enter_tp
from megaloom.precision import autocast
from megaloom.train.objective import Micro

REFERENCE_FILE = "reference_logps.pt"


def head_token_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(target) per position (B, T) from the last stage's head and final hidden states, through the
    head's own (possibly vocab-parallel, possibly tied) weight; 0 where the target is -100."""
    weight = head._tied[0].weight if head._tied else head.weight
    tp = getattr(head, "tp", None)
    if tp is None:
        return token_logprobs(h, targets, weight, vocab_size=vocab_size)
    return token_logprobs(enter_tp(h, tp), targets, weight, group=tp, vocab_start=head.start, vocab_size=vocab_size)


class DPOObjective(PairObjective):
    """Preference pairs -> the DPO-family loss of `dpo.*` against the reference's log-probabilities."""

    name = "dpo"
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.reference: Reference | None = None  # when the reference is a model (the base with adapters off, or a copy)
        self.table: dict[str, torch.Tensor] | None = None  # precomputed: split -> (pairs, 2) log-probabilities
        self.precision = cfg.train.precision

    def describe(self) -> str:
        o = self.cfg.dpo
        ref = ("none" if o.loss == "simpo" else "precomputed once" if o.precompute_reference
               else describe_reference(self.cfg))
        return f"; DPO ({o.loss}, beta {o.beta}){self.pairs_clause()}, reference: {ref}"

    # ------------------------------------------------------------------ the reference

    def side_models(self) -> dict:
        copy = self.reference.copy if self.reference is not None else None
        return {"reference": (copy.model, None)} if copy is not None else {}

    def start(self, trainer: Any) -> None:
        o = self.cfg.dpo
        if o.loss == "simpo":
            return
        if o.precompute_reference:
            self.table = self._precomputed(trainer)
            return
        self.reference = build_reference(self.cfg, trainer)

    def _precomputed(self, trainer: Any) -> dict[str, torch.Tensor]:
        """The reference's log-probabilities of every pair: read from the run directory, or (a fresh run)
        computed now with the model itself, before its first step, and written there."""
        path = Path(trainer.run_dir) / REFERENCE_FILE
        if path.is_file():
            return torch.load(path, map_location="cpu")
        if trainer.step > 0:
            raise ConfigError(f"dpo.precompute_reference = true but {path} is missing and the run is at step "
                              f"{trainer.step}: the model is no longer the reference; start a fresh run directory")
        grid = trainer.grid
        table = {}
        trainer.model.eval()
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            table[split] = self._score_all(trainer.model, trainer.runner, data, grid, trainer.device)
        trainer.model.train()
        if grid.rank == 0:
            tmp = path.with_name(path.name + ".tmp")
            torch.save(table, tmp)
            tmp.replace(path)
        return table

    @torch.no_grad()
    def _score_all(self, model: nn.Module, runner: Any, data: Any, grid: Any, device: torch.device) -> torch.Tensor:
        """(pairs, 2) summed log-probabilities of a split under `model`: each data-parallel replica scores
        every dp-th micro-batch, and the sums over the pipeline (only the last stage has them) and over the
        replicas give every rank all of them."""
        t = self.cfg.train
        pairs = len(data) // 2
        out = torch.zeros(pairs * 2, device=device)
        batches = sft_eval_batches(data, self.cfg.model.seq_len, t.micro_batch, -(-pairs // t.micro_batch), False)
        for i, (x, y, ids) in enumerate(batches):
            if i % grid.dp != grid.dp_rank:
                continue
            seq = _sequence_logps(model, runner, x.to(device), y.to(device), self.precision)
            if seq is not None:
                rows = torch.arange(len(ids), device=device)
                real = ids.to(device) >= 0
                out[(ids.to(device) * 2 + rows % 2)[real]] = seq[real]
        if grid.pp > 1:
            dist.all_reduce(out, group=grid.pp_group)
        if grid.dp > 1:
            dist.all_reduce(out, group=grid.dp_group)
        return out.view(pairs, 2).cpu()

    def prepare(self, batch: Micro, split: str) -> Micro:
        """(inputs, targets, pair ids) -> (inputs, targets, reference log-probabilities per row)."""
        x, y, ids = batch
        if self.cfg.dpo.loss == "simpo":
            ref = torch.zeros(len(ids), device=x.device)
        elif self.table is not None:
            table = self.table[split].to(x.device).view(-1)
            rows = torch.arange(len(ids), device=x.device)
            ref = torch.where(ids >= 0, table[(ids.clamp(min=0) * 2 + rows % 2)], 0.0)
        else:
            seq, ref_model = [], self.reference
            step = self.cfg.train.micro_batch * self.rows
            with ref_model.use():
                for xs, ys in zip(x.split(step), y.split(step)):
                    seq.append(_sequence_logps(ref_model.model, ref_model.runner, xs, ys, self.precision))
            ref = torch.cat(seq) if seq[0] is not None else torch.zeros(len(ids), device=x.device)
        return x, y, torch.stack([ref, self.valid(ids)], dim=1)

    # ------------------------------------------------------------------ the loss

    def call(self, model: nn.Module, inputs: torch.Tensor, micro: Micro, last: bool = True, **kwargs) -> torch.Tensor:
        if not last:
            return model(inputs, **kwargs)
        _, y, extra = micro
        ref, valid = extra[:, 0], extra[:, 1]
        o, vocab = self.cfg.dpo, self.cfg.model.vocab_size

        def loss_of(head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
            targets = nn.functional.pad(y, (prepended, 0), value=IGNORE_INDEX) if prepended else y
            seq = sequence_logprobs(head_token_logprobs(head, h, targets, vocab), targets)
            keep = valid[0::2] > 0
            loss, metrics = dpo_loss(seq.sum[0::2][keep], seq.sum[1::2][keep], ref[0::2][keep], ref[1::2][keep],
                                     loss=o.loss, beta=o.beta, label_smoothing=o.label_smoothing,
                                     simpo_gamma=o.simpo_gamma, chosen_tokens=seq.tokens[0::2][keep],
                                     rejected_tokens=seq.tokens[1::2][keep])
            self.record(**metrics)
            return loss

        return model(inputs, head_fn=loss_of, **kwargs)


def _sequence_logps(model: nn.Module, runner: Any, x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor | None:
    """Summed log-probabilities of each row's scored targets, forward only (None on a pipeline rank that is
    not the last stage): the model's per-token losses under reduction="none", negated."""
    with torch.no_grad():
        if runner is None:
            with autocast(precision, x.device):
                per_token = model(x, y, reduction="none")
        else:
            per_token = runner.forward_outputs([(x, y)], precision, [{"reduction": "none"}] * len(runner.chunks))[0]
    if per_token is None:
        return None
    return -per_token.float().masked_fill(y == IGNORE_INDEX, 0.0).sum(-1)
