"""Dropout whose masks do not depend on the parallel layout.

The mask of a call is drawn from a generator seeded by (the run's seed, the module's canonical name,
which micro-batch of the global batch it is processing): every dropout site of every layer sees the
same sequence of masks whichever process holds that layer and however many layers it holds (pipeline
stages process micro-batches in order), and whichever data-parallel replica runs the micro-batch
(replica r of d holds micro-batches r·m .. r·m + m - 1 of the d·m in a step, `set_replica`).
The mask is drawn for the *full* activation; a rank that holds only a slice of the sequence (sequence
parallelism) keeps the matching slice. So replicated regions draw identical masks on every tp rank,
split regions draw different ones, and the masks — hence the results — are the same for any (t, p, d)
with the same train.micro_batch. The run's seed is `torch.initial_seed()`, which the trainer sets from train.seed.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class LayoutDropout(nn.Module):
    def __init__(self, p: float, key: str, uses: int = 1):
        super().__init__()
        self.p, self.key = p, key
        self.uses = uses  # calls per micro-batch forward (a block applies its dropout twice)
        self.calls = 0  # training forwards so far on this replica
        self.seq_rank, self.seq_size = 0, 1  # this module sees sequence slice seq_rank of seq_size
        self.dp_rank, self.dp_size, self.per_replica = 0, 1, 1  # micro-batches per step on each replica

    def set_replica(self, dp_rank: int, dp_size: int, microbatches: int) -> None:
        self.dp_rank, self.dp_size, self.per_replica = dp_rank, dp_size, microbatches

    def mask_index(self) -> int:
        """The number of this call counted over the global batch: the same for a micro-batch on any layout."""
        local, site = divmod(self.calls, self.uses)
        step, i = divmod(local, self.per_replica)
        return ((step * self.dp_size + self.dp_rank) * self.per_replica + i) * self.uses + site

    def set_sequence_shard(self, tp) -> None:
        if tp.sequence_parallel:
            self.seq_rank, self.seq_size = tp.rank, tp.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        digest = hashlib.blake2b(f"{torch.initial_seed()}/{self.key}/{self.mask_index()}".encode(),
                                 digest_size=8).digest()
        self.calls += 1
        gen = torch.Generator(device=x.device).manual_seed(int.from_bytes(digest, "little") >> 1)
        B, T, H = x.shape
        full = torch.rand((B, T * self.seq_size, H), generator=gen, device=x.device)
        keep = full[:, self.seq_rank * T:(self.seq_rank + 1) * T] >= self.p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, key={self.key!r}"
