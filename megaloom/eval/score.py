"""Score log-likelihood requests with a model in any (t, p, d) layout.

The model is what `megaloom.train.assemble.build_parallel_model` returns on this rank (the whole model,
a tensor-parallel shard of it, or its pipeline chunks with their runner): the same objects training
uses, and the same forward (`Transformer.forward(x, y, reduction="none")`, through the
`PipelineRunner` under pipelining), so evaluation has no model code of its own.

- Batching: requests sorted by length (longest first, as the harness does), `batch_size` rows per
  micro-batch, padded on the right. Attention is causal, so a position never sees the padding after
  it, and padded positions have target -100: padding cannot change a score (tests compare batch 1
  with batch 16).
- Pipeline: a call sends up to `pp` micro-batches of one shape through the stages.
- Data parallel: the calls go round-robin over the dp replicas, every replica makes the same number
  of calls (a replica with none left repeats its last one), which FSDP's collectives need. The scores
  come back to every rank with one all-reduce over the world: the last stage's first tp rank writes
  each score, the other ranks add 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaloom.eval.requests import Request, model_input
from megaloom.parallel.grid import ProcessGrid
from megaloom.parallel.pipeline import PipelineRunner
from megaloom.precision import autocast

IGNORE_INDEX = -100
PAD_TOKEN = 0  # any valid id: padded positions come after every scored one and are never scored


@dataclass
class Scorer:
    """One model as this rank holds it, and how to run it."""

    model: torch.nn.Module  # the model (any tp shard of it), or a ModuleList of this rank's pipeline chunks
    runner: PipelineRunner | None  # the pipeline runner when pp > 1
    grid: ProcessGrid
    device: torch.device
    context: int  # the most tokens the model takes (the default max_length of a task)
    precision: str = "fp32"
    seq_multiple: int = 1  # padded lengths are a multiple of this (tp under sequence parallelism)

    @torch.no_grad()
    def loglikelihoods(self, requests: Sequence[Request], max_length: int, batch_size: int = 16,
                       progress: Callable[[int], None] | None = None) -> list[float]:
        """The summed log-probability of each request's continuation, in request order, on every rank;
        inputs longer than `max_length` are cut from the left (lm_eval's max_length)."""
        if not 1 <= max_length <= self.context:
            raise ValueError(f"--max-length {max_length} must be between 1 and the model's context ({self.context})")
        rows = [model_input(r, max_length) for r in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        per_call = self.grid.pp if self.runner is not None else 1
        calls = [batches[i: i + per_call] for i in range(0, len(batches), per_call)]
        dp, me = self.grid.dp, self.grid.dp_rank
        mine = calls[me::dp]
        rounds = -(-len(calls) // dp)
        scores = torch.zeros(len(rows), dtype=torch.float64, device=self.device)
        writes = self.grid.pp_rank == self.grid.pp - 1 and self.grid.tp_rank == 0
        was_training = self.model.training
        self.model.eval()
        try:
            for r in range(rounds):
                call = mine[r] if r < len(mine) else (mine[-1] if mine else batches[:1])
                got = self._call([[rows[i] for i in b] for b in call])
                if r < len(mine):
                    if writes:
                        for batch, lls in zip(call, got):
                            scores[torch.tensor(batch, device=self.device)] = lls
                    if progress is not None:
                        progress(sum(len(b) for b in call))
        finally:
            self.model.train(was_training)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(scores)
        return scores.tolist()

    def _call(self, micro: list[list[tuple[list[int], int]]]) -> list[torch.Tensor]:
        """One forward of micro-batches padded to one length; each row's summed log-likelihood (float64),
        on the last pipeline stage (empty tensors elsewhere)."""
        longest = max(len(tokens) - 1 for batch in micro for tokens, _ in batch)
        length = -(-longest // self.seq_multiple) * self.seq_multiple
        n_rows = max(len(batch) for batch in micro)  # the micro-batches of a pipeline call share one shape
        tensors = [self._pad(batch, n_rows, length) for batch in micro]
        if self.runner is None:
            x, y = tensors[0]
            with autocast(self.precision, self.device):
                nll = self.model(x, y, reduction="none")
            return [-nll.double().sum(dim=-1)[: len(micro[0])]]
        chunk_kwargs = [{"reduction": "none"}] * len(self.runner.chunks)
        outs = self.runner.forward_outputs(tensors, self.precision, chunk_kwargs)
        return [-o.double().sum(dim=-1)[: len(b)] if o is not None else torch.empty(0) for o, b in zip(outs, micro)]

    def _pad(self, batch: list[tuple[list[int], int]], n_rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (n_rows, length): the targets are the inputs shifted by one, -100 except on
        each row's last `n_scored` real positions (and on the rows added to fill a pipeline call)."""
        x = torch.full((n_rows, length), PAD_TOKEN, dtype=torch.long)
        y = torch.full((n_rows, length), IGNORE_INDEX, dtype=torch.long)
        for row, (tokens, n_scored) in enumerate(batch):
            n = len(tokens) - 1
            x[row, :n] = torch.tensor(tokens[:-1])
            y[row, n - n_scored: n] = torch.tensor(tokens[-n_scored:])
        return x.to(self.device), y.to(self.device)
