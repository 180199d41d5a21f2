"""What part of a full, single-device tensor a tensor-parallel parameter holds.

The parallel layers attach a `ShardSpec` to each parameter they split (`parallel/tensor.py`); the
layout-independent initialisation (`model/init.py`) and the sharded checkpoints
(`train/sharded_state.py`) read it to cut a rank's slice out of the full tensor or to put it back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a full tensor a (tensor-parallel) parameter holds: along `dim`, the full tensor is
    a concatenation of `blocks` (one block for plain weights; q, k, v for a fused QKV) and the
    parameter is the concatenation of slice `rank` of `size` of every block."""

    full_shape: tuple[int, ...]
    dim: int
    blocks: tuple[int, ...]
    rank: int
    size: int

    def take(self, full: torch.Tensor) -> torch.Tensor:
        parts = full.split(list(self.blocks), dim=self.dim)
        return torch.cat([p.chunk(self.size, dim=self.dim)[self.rank] for p in parts], dim=self.dim)

    def assemble(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of `take` over all ranks' shards."""
        per_rank = [b // self.size for b in self.blocks]
        pieces = [s.split(per_rank, dim=self.dim) for s in shards]
        return torch.cat([pieces[r][b] for b in range(len(self.blocks)) for r in range(self.size)], dim=self.dim)
