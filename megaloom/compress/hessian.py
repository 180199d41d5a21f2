"""Calibration: token windows from text files, and the block-by-block pass that gives every linear of a
block the Gram matrix of its inputs, H = sum over calibration tokens of x x^T.

The pass is sequential, as in the GPTQ, SparseGPT and Wanda papers: the calibration hidden states go
through block 0, its linears are compressed, the states are recomputed through the compressed block
and become block 1's inputs, and so on; each block's inputs are those of the model compressed so far.
All four linears of a block see the inputs of one pass through the block (the repositories' default).
H is the layer-wise objective's Hessian up to a factor 2 (GPTQ eq. 1-2); Wanda reads its diagonal,
the squared input norms ||x_j||^2.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from megaloom.compress.quantize import LINEARS
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import ConfigError
from megaloom.model.transformer import Transformer


def read_documents(files: list[str]) -> list[str]:
    """A text file is one document; a .jsonl file one document per line, in its "text" field."""
    docs = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"--calib file '{f}' does not exist; pass text or .jsonl files")
        if path.suffix == ".jsonl":
            docs += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            docs.append(path.read_text(encoding="utf-8"))
    return docs


def calibration_windows(tokenizer: Tokenizer, files: list[str], samples: int, length: int,
                        seed: int = 0) -> torch.Tensor:
    """`samples` windows of `length` tokens at random offsets (seeded) of the documents joined by eos,
    as the GPTQ and Wanda repositories draw theirs from C4: (samples, length) int64."""
    if samples < 1 or length < 2:
        raise ConfigError(f"--calib-samples {samples} and --calib-length {length} must be at least 1 and 2")
    ids: list[int] = []
    for doc in read_documents(files):
        ids += tokenizer.encode(doc) + [tokenizer.eos_id]
    if len(ids) < length:
        raise ConfigError(f"--calib {' '.join(files)} holds {len(ids)} tokens, fewer than one window of "
                          f"--calib-length {length}; pass more text or a shorter --calib-length")
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - length + 1) for _ in range(samples)]
    flat = torch.tensor(ids, dtype=torch.long)
    return torch.stack([flat[s:s + length] for s in starts])


class Grams:
    """X^T X of the inputs of some linears, accumulated in float64 by forward pre-hooks; with
    `diagonal`, only its diagonal (the squared input norms, all Wanda reads: d values, not d x d)."""

    def __init__(self, modules: dict[str, nn.Module], diagonal: bool = False):
        self.h: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.diagonal = diagonal
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            if name not in self.h:
                shape = (x.shape[1],) if self.diagonal else (x.shape[1], x.shape[1])
                self.h[name] = torch.zeros(shape, dtype=torch.float64, device=x.device)
                self.rows[name] = 0
            if self.diagonal:
                self.h[name] += x.square().sum(dim=0)
            else:
                self.h[name].addmm_(x.T, x)
            self.rows[name] += x.shape[0]
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


Visit = Callable[[int, nn.Module, dict[str, torch.Tensor]], None]


@torch.no_grad()
def blockwise(model: Transformer, tokens: torch.Tensor, visit: Visit, batch: int = 8,
              progress: Callable[[str], None] | None = None, diagonal: bool = False) -> None:
    """Run the calibration `tokens` (N, L) through `model` (one process, whole) block by block; for
    each block call `visit(layer, block, grams)` with `grams` = {"attn.qkv": H, ...} (float64) of the
    block's four linears (with `diagonal`, H's diagonal only), then recompute the block's outputs with
    whatever `visit` changed. Each block runs twice over the calibration states (once to gather H,
    once compressed), never the blocks before it."""
    rope = model.rope
    x = torch.cat([model.embed(t) for t in tokens.split(batch)])
    for i, block in model.layers.items():
        grams = Grams({path: block.get_submodule(path) for path in LINEARS}, diagonal)
        try:
            for xb in x.split(batch):
                block(xb, rope)
        finally:
            grams.close()
        visit(int(i), block, grams.h)
        x = torch.cat([block(xb, rope) for xb in x.split(batch)])
        if progress is not None:
            progress(f"layer {int(i) + 1}/{len(model.layers)}")
