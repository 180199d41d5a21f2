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
    parameter is the concatenation of slice `rank` of `size` of every block.

    Every rank holds ceil(block/size) entries of each block (`extent`): rank r's slice starts at
    r·extent, and where `size` does not divide a block (a vocabulary of any V, `layout.vocab_rows`) the
    entries past the block's end on the last rank(s) are padding, zeros that belong to no full tensor:
    `take` writes them as zeros, `assemble`, the checkpoints' pieces and the pretrained fill skip them
    (`real` counts the others). With even blocks this is the plain split into `size` equal slices."""

    full_shape: tuple[int, ...]
    dim: int
    blocks: tuple[int, ...]
    rank: int
    size: int

    def extent(self, block: int) -> int:
        """Entries of a block of length `block` that each rank holds, padding included."""
        return -(-block // self.size)

    def real(self, block: int, rank: int | None = None) -> int:
        """Entries of its slice of `block` that rank `rank` (default this one) holds for real, not padding."""
        n = self.extent(block)
        return max(0, min(n, block - (self.rank if rank is None else rank) * n))

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape of the parameter on every rank."""
        shape = list(self.full_shape)
        shape[self.dim] = sum(self.extent(b) for b in self.blocks)
        return tuple(shape)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        parts = []
        for part in full.split(list(self.blocks), dim=self.dim):
            n, lo = self.extent(part.shape[self.dim]), self.rank * self.extent(part.shape[self.dim])
            piece = part.narrow(self.dim, lo, self.real(part.shape[self.dim]))
            if piece.shape[self.dim] < n:  # the padding of the last shard(s)
                pad = list(piece.shape)
                pad[self.dim] = n - piece.shape[self.dim]
                piece = torch.cat([piece, piece.new_zeros(pad)], dim=self.dim)
            parts.append(piece)
        return torch.cat(parts, dim=self.dim)

    def assemble(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of `take` over all ranks' shards (their padding left out)."""
        pieces = [s.split([self.extent(b) for b in self.blocks], dim=self.dim) for s in shards]
        return torch.cat([pieces[r][i].narrow(self.dim, 0, self.real(b, r)) for i, b in enumerate(self.blocks)
                          for r in range(self.size)], dim=self.dim)
