"""Batches from a prepared corpus: memory-mapped tokens, deterministic order, exact resume.

Sampling is defined over the GLOBAL batch and each data-parallel rank takes a contiguous slice
of it, so the union of all ranks' batches at a step is exactly what a single process would see.
That is what makes a dp=N run train on the same data as the dp=1 run, and why a loader state
saved by any rank can resume any dp size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megaloom.data.prepare import load_corpus_info
from megaloom.data.sources import DataError

_SPLITS = ("train", "val")


class TokenDataset:
    """One split of a prepared corpus, memory-mapped read-only (nothing is loaded up front)."""

    def __init__(self, directory: str | Path, split: str):
        if split not in _SPLITS:
            raise DataError(f"split: {split!r} is unknown; use 'train' or 'val'")
        self.directory = Path(directory)
        self.split = split
        self.info = load_corpus_info(self.directory)
        path = self.directory / f"{split}.bin"
        if path.stat().st_size == 0:
            # np.memmap cannot map an empty file; an empty split is legal (e.g. a 1-doc corpus).
            self.tokens: np.ndarray = np.zeros(0, dtype=self.info.dtype)
        else:
            self.tokens = np.memmap(path, dtype=self.info.dtype, mode="r")
        self.doc_starts: np.ndarray = np.load(self.directory / f"{split}.idx.npy")

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.directory)!r}, {self.split!r}, tokens={len(self)})"


class BatchLoader:
    """Endless (inputs, targets) batches of non-overlapping windows, reshuffled every epoch."""

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        batch_size: int,
        *,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        pin_memory: bool = False,
    ):
        _check_shape(seq_len, batch_size)
        if dp_size < 1 or batch_size % dp_size:
            raise DataError(
                f"train.global_batch: {batch_size} is not divisible by parallel.dp={dp_size}; "
                f"use a global batch that is a multiple of {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"parallel.dp: rank {dp_rank} is outside 0..{dp_size - 1}")
        self.dataset = dataset
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.num_samples = (len(dataset) - 1) // seq_len if len(dataset) > 0 else 0
        if self.num_samples < batch_size:
            raise DataError(
                f"train.global_batch: the {dataset.split} split ({len(dataset)} tokens, "
                f"{self.num_samples} windows of seq_len {seq_len}) is too small for a batch of "
                f"{batch_size} x {seq_len}; use more data, a smaller batch or a shorter seq_len"
            )
        # The tail of an epoch that does not fill a global batch is dropped, so every step
        # sees exactly batch_size windows on every rank.
        self.steps_per_epoch = self.num_samples // batch_size
        self.epoch = 0
        self.step = 0
        self._perm = self._permutation(0)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), each int64 of shape (batch_size / dp_size, seq_len)."""
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        local = self.batch_size // self.dp_size
        first = self.step * self.batch_size + self.dp_rank * local
        self.step += 1
        x, y = _windows(self.dataset.tokens, self._perm[first : first + local], self.seq_len)
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def state_dict(self) -> dict:
        """Where the loader is; identical on every dp rank, plain ints only."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off (refuses a state from other settings)."""
        for key in ("seed", "seq_len", "batch_size", "num_samples"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"data loader state: {key}={state[key]} in the checkpoint but "
                    f"{getattr(self, key)} now; resume with the settings and corpus it was "
                    "saved with, or start a fresh run"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._perm = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)


def eval_batches(
    dataset: TokenDataset, seq_len: int, batch_size: int, n_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to `n_batches` batches of consecutive windows from the start of the split.

    Always the same windows, so validation losses of different steps and runs compare.
    A split too short for one full batch gives one smaller batch of every window it has.
    """
    _check_shape(seq_len, batch_size)
    if n_batches < 1:
        raise DataError(f"eval batches: n_batches={n_batches} must be >= 1")
    num_windows = (len(dataset) - 1) // seq_len if len(dataset) > 0 else 0
    if num_windows == 0:
        fix = "use more data" + (" or raise data.val_fraction" if dataset.split == "val" else "")
        raise DataError(
            f"data.dir: the {dataset.split} split has {len(dataset)} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}; {fix}"
        )
    full = min(n_batches, num_windows // batch_size)
    if full == 0:
        yield _windows(dataset.tokens, np.arange(num_windows), seq_len)
        return
    for b in range(full):
        yield _windows(dataset.tokens, np.arange(b * batch_size, (b + 1) * batch_size), seq_len)


def _check_shape(seq_len: int, batch_size: int) -> None:
    if seq_len < 1:
        raise DataError(f"model.seq_len: {seq_len} must be >= 1")
    if batch_size < 1:
        raise DataError(f"train.global_batch: {batch_size} must be >= 1")


def _windows(
    tokens: np.ndarray, indices: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows tokens[i*L : i*L + L + 1] for each i, split into (inputs, targets)."""
    positions = indices[:, None] * seq_len + np.arange(seq_len + 1)
    window = torch.from_numpy(tokens[positions].astype(np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
