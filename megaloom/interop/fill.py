"""Fill a model, in any layout, with pretrained weights: the same pieces a checkpoint load fills.

`megaloom.train.sharded_state.model_entries` describes what a rank holds in any (t, p, d, ZeRO)
layout as pieces (a view into the rank's memory, and where it sits in the full tensor), the form
`checkpoint.load` reads into. Pretrained weights fill exactly those pieces: each piece is a box of
a megaloom tensor, which `names.hf_parts` turns into boxes of Hugging Face tensors, read as slices.
So a rank reads what it holds, and one mechanism serves every layout, a checkpoint or a pretrained
model alike.
"""

from __future__ import annotations

import torch

from megaloom.config import ModelConfig
from megaloom.errors import ConfigError
from megaloom.interop.names import Part, canonical_hf_name, hf_parts, hf_shapes, ignorable
from megaloom.interop.sources import open_source
from megaloom.train.sharded_state import Sharded


def pretrained_source(cfg: ModelConfig):  # noqa: ANN201 (SafetensorsSource | GGUFSource)
    """The weights of model.pretrained, checked against the model of `cfg` before anything is read."""
    source = open_source(cfg.pretrained, cfg.heads, cfg.n_kv_heads, lambda n: canonical_hf_name(cfg, n))
    check_source(cfg, source.shapes(), source.where)
    return source


def check_source(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """One line when the file does not hold exactly the model of `cfg`: missing tensors, unexpected ones,
    or a tensor of another shape."""
    want = hf_shapes(cfg)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(n for n in set(shapes) - set(want) if not ignorable(cfg, n))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not"
        raise ConfigError(f"model.pretrained = '{where}' does not hold the model of model.*: it {what} "
                          f"({len(missing)} missing, {len(extra)} unexpected tensors)")
    for name, shape in want.items():
        if tuple(shapes[name]) != shape:
            raise ConfigError(f"model.pretrained = '{where}': {name} has shape {tuple(shapes[name])} there but "
                              f"{shape} in the model of model.*")


@torch.no_grad()
def fill(state: dict[str, Sharded], cfg: ModelConfig, source) -> None:  # noqa: ANN001 (a source of sources.py)
    """Copy into every piece of `state` (keys `model/<name>`, as `model_entries` gives them) its box of
    the pretrained weights."""
    for key, sharded in state.items():
        parts = hf_parts(cfg, key.removeprefix("model/"), tuple(sharded.shape))
        for piece in sharded.pieces:
            box = read_box(source, parts, piece.offsets, tuple(piece.view.shape))
            piece.view.copy_(box.to(piece.view.dtype))
        source.release()


def read_box(source, parts: list[Part], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:  # noqa: ANN001
    """Rows [offsets[0], +sizes[0]) (and columns [offsets[1], +sizes[1]) of a matrix) of the megaloom
    tensor made of `parts`, read part by part from `source`."""
    r0, r1 = offsets[0], offsets[0] + sizes[0]
    cols = slice(offsets[1], offsets[1] + sizes[1]) if len(sizes) == 2 else None
    out, start = [], 0
    for part in parts:
        lo, hi = max(r0, start), min(r1, start + part.rows)
        if lo < hi:
            rows = slice(lo - start, hi - start)
            if cols is None:
                out.append(source.read(part.hf, (rows,)))
            elif part.transposed:  # a Conv1D weight: megaloom's rows are its columns
                out.append(source.read(part.hf, (cols, rows)).T)
            else:
                out.append(source.read(part.hf, (rows, cols)))
        start += part.rows
    return torch.cat(out) if len(out) > 1 else out[0]
