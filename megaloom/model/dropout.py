"""Dropout whose masks do not depend on the parallel layout.

Each call draws one seed from the global torch RNG (all ranks of a tensor-parallel group hold the same
RNG state and make the same calls, as does a single device), then draws the mask of the *full*
activation from a generator with that seed. A rank that holds only a slice of the sequence (sequence
parallelism) keeps the matching slice of the mask. So replicated regions draw identical masks on every
tp rank, split regions draw different ones, and the masks — hence the results — are the same for any t.
"""

from __future__ import annotations

import torch
from torch import nn


class LayoutDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.seq_rank, self.seq_size = 0, 1  # this module sees sequence slice seq_rank of seq_size

    def set_sequence_shard(self, tp) -> None:
        if tp.sequence_parallel:
            self.seq_rank, self.seq_size = tp.rank, tp.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        seed = int(torch.randint(0, 2**62, (1,)).item())  # CPU RNG: no device sync
        gen = torch.Generator(device=x.device).manual_seed(seed)
        B, T, H = x.shape
        full = torch.rand((B, T * self.seq_size, H), generator=gen, device=x.device)
        keep = full[:, self.seq_rank * T:(self.seq_rank + 1) * T] >= self.p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
