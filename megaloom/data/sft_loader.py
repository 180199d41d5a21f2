"""Batches of conversations from a prepared SFT corpus (`sft.py`): padded, or packed several to a row.

A row is `seq_len + 1` tokens, split into inputs and targets as in pretraining. Targets are -100 where
the loss does not count (prompt tokens, padding, and under packing the step from one conversation's
last token to the next one's first), which every loss of megaloom leaves out of its mean.

- Unpacked (default): one conversation per row (cut to seq_len + 1 tokens), padded with eos. Padding
  follows the conversation, so causal attention keeps it out of every counted token: batches are
  (inputs, targets) and the model runs exactly as in pretraining.
- Packed (data.packing): conversations are laid one after another into each row while they fit (in the
  epoch's shuffled order), and batches are (inputs, targets, docs), `docs` numbering the conversations
  along the row (padding is one more). The model restarts positions at each conversation and keeps its
  attention inside it (`model/layers.py` Packing), so each conversation's loss is the one it has alone.

Preference pairs (`CorpusInfo.group` = 2: a pair's chosen and rejected conversations are adjacent
documents) are drawn as items: an epoch shuffles the pairs, a batch of `global_batch` pairs is its
2·global_batch rows (chosen, rejected, chosen, ...), and batches are (inputs, targets, pair ids), the
pair's index in its split on each of its two rows (DPO's stored reference log-probabilities are looked
up by it).

Order and resume follow `loader.BatchLoader`: the rows of an epoch are a pure function of (seed, epoch),
each step takes the next `global_batch` rows and every data-parallel rank its contiguous slice, so a
dp=N run sees the dp=1 run's batches and a loader state resumes exactly, in any layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megaloom.data.prepare import load_corpus_info
from megaloom.data.sources import DataError

IGNORE_INDEX = -100
Batch = tuple[torch.Tensor, ...]


class SFTDataset:
    """One split of a prepared SFT corpus: tokens and loss mask memory-mapped, one document per conversation."""

    def __init__(self, directory: str | Path, split: str):
        if split not in ("train", "val"):
            raise DataError(f"split: {split!r} is unknown; use 'train' or 'val'")
        self.directory, self.split = Path(directory), split
        self.info = load_corpus_info(self.directory)
        mask_path = self.directory / f"{split}.mask.bin"
        if not mask_path.is_file():
            raise DataError(f"data.dir: {str(self.directory)!r} is a pretraining corpus (no {mask_path.name}); "
                            "train.objective = \"sft\" needs one prepared from conversations")
        self.tokens = _map(self.directory / f"{split}.bin", self.info.dtype)
        self.mask = _map(mask_path, "uint8")
        starts = np.load(self.directory / f"{split}.idx.npy")
        self.bounds = np.stack([starts, np.append(starts[1:], len(self.tokens))], axis=1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.bounds)

    def lengths(self, cap: int) -> np.ndarray:
        return np.minimum(self.bounds[:, 1] - self.bounds[:, 0], cap)


def _map(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap cannot map an empty file (an empty validation split)
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int, packing: bool) -> list[list[int]]:
    """Documents of each row, taken in `order`: one per row, or (packing) as many as fit one after another
    in `capacity` tokens, a row closed when the next document does not fit (a longer one is cut)."""
    if not packing:
        return [[int(i)] for i in order]
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if row and used + n > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(row)
    return rows


def item_rows(lengths: np.ndarray, order: np.ndarray, capacity: int, packing: bool, group: int = 1) -> list[list[int]]:
    """The rows of items taken in `order`: `pack_rows` for conversations; a pair's two documents, one per
    row, for preference pairs (group 2)."""
    if group == 1:
        return pack_rows(lengths, order, capacity, packing)
    return [[int(i) * group + k] for i in order for k in range(group)]


def make_rows(dataset: SFTDataset, rows: list[list[int]], seq_len: int, packing: bool,
              pad_rows: int = 0, group: int = 1) -> Batch:
    """(inputs, targets[, docs]) of shape (len(rows) + pad_rows, seq_len); a padding row counts no target.
    Pairs (group 2): (inputs, targets, pair ids), a padding row's id -1."""
    n = len(rows) + pad_rows
    buf = np.full((n, seq_len + 1), dataset.info.eos_id, dtype=np.int64)
    counted = np.zeros((n, seq_len + 1), dtype=bool)
    docs = np.zeros((n, seq_len + 1), dtype=np.int64)
    for r, members in enumerate(rows):
        pos = 0
        for j, i in enumerate(members):
            start, end = dataset.bounds[i]
            k = min(end - start, seq_len + 1 - pos)
            buf[r, pos:pos + k] = dataset.tokens[start:start + k]
            counted[r, pos:pos + k] = dataset.mask[start:start + k] != 0
            docs[r, pos:pos + k] = j
            pos += k
        docs[r, pos:] = len(members)  # the padding is a document of its own
    # a target counts where its token does and it continues the same conversation
    keep = counted[:, 1:] & (docs[:, 1:] == docs[:, :-1])
    x = torch.from_numpy(buf[:, :-1].copy())
    y = torch.from_numpy(np.where(keep, buf[:, 1:], IGNORE_INDEX))
    if group > 1:
        ids = torch.tensor([r[0] // group for r in rows] + [-1] * pad_rows, dtype=torch.int64)
        return x, y, ids
    return (x, y, torch.from_numpy(docs[:, :-1].copy())) if packing else (x, y)


class SFTBatchLoader:
    """Endless batches of conversations, reshuffled every epoch; `next_batch` gives this rank's rows."""

    def __init__(self, dataset: SFTDataset, seq_len: int, batch_size: int, *, seed: int, packing: bool = False,
                 dp_rank: int = 0, dp_size: int = 1, pin_memory: bool = False):
        if dp_size < 1 or batch_size % dp_size:
            raise DataError(f"train.global_batch: {batch_size} is not divisible by parallel.dp={dp_size}")
        self.dataset, self.seq_len, self.batch_size, self.seed = dataset, seq_len, batch_size, seed
        self.packing, self.dp_rank, self.dp_size = packing, dp_rank, dp_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.group = dataset.info.group
        if self.group > 1 and packing:
            raise DataError("data.packing = true does not apply to preference pairs; set data.packing=false")
        self.num_docs = len(dataset)
        self.lengths = dataset.lengths(seq_len + 1)
        self.epoch, self.step = 0, 0
        self._set_epoch(0)

    def _set_epoch(self, epoch: int) -> None:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs // self.group)
        self.rows = item_rows(self.lengths, order, self.seq_len + 1, self.packing, self.group)
        # the tail that does not fill a global batch is dropped, as in pretraining
        self.steps_per_epoch = len(self.rows) // (self.batch_size * self.group)
        if self.steps_per_epoch == 0:
            raise DataError(f"train.global_batch: the {self.dataset.split} split has {self.num_docs} conversations "
                            f"in {len(self.rows)} rows of seq_len {self.seq_len}, fewer than a batch of "
                            f"{self.batch_size}; use more data or a smaller batch")
        self.epoch = epoch

    def next_batch(self) -> Batch:
        """This rank's (inputs, targets) or, packed, (inputs, targets, docs), each (batch / dp, seq_len)."""
        if self.step == self.steps_per_epoch:
            self._set_epoch(self.epoch + 1)
            self.step = 0
        local = self.batch_size // self.dp_size * self.group
        first = self.step * self.batch_size * self.group + self.dp_rank * local
        self.step += 1
        batch = make_rows(self.dataset, self.rows[first:first + local], self.seq_len, self.packing, group=self.group)
        return tuple(t.pin_memory() for t in batch) if self.pin_memory else batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "num_docs": self.num_docs, "packing": self.packing}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size", "num_docs", "packing"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"data loader state: {key}={state.get(key)} in the checkpoint but "
                                f"{getattr(self, key)} now; resume with the settings and data it was saved with, "
                                "or start a fresh run")
        self._set_epoch(int(state["epoch"]))
        self.step = int(state["step"])


def sft_eval_batches(dataset: SFTDataset, seq_len: int, batch_size: int, n_batches: int,
                     packing: bool) -> list[Batch]:
    """Up to `n_batches` micro-batches of the split's first conversations, in order (the same every time,
    so validation losses compare); the last is filled up with padding rows, which count no target."""
    if len(dataset) == 0:
        raise DataError(f"data.val_fraction: the {dataset.split} split holds no conversation; raise "
                        "data.val_fraction or add data")
    group = dataset.info.group
    rows = item_rows(dataset.lengths(seq_len + 1), np.arange(len(dataset) // group), seq_len + 1, packing, group)
    size = batch_size * group  # rows per micro-batch (pairs: both of each pair)
    rows = rows[:n_batches * size]
    out = []
    for b in range(0, len(rows), size):
        part = rows[b:b + size]
        out.append(make_rows(dataset, part, seq_len, packing, pad_rows=size - len(part), group=group))
    return out
