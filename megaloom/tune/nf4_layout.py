"""Where an NF4 (QLoRA) base fits a layout, from the model's shape alone (no torch): config validation
calls `check_nf4_layout` before anything is built, and `qlora.py` quantizes by the same rules and says
the same lines.

qlora.py quantizes each block linear whole, in blocks of 64 consecutive weights (row-major), and each
rank keeps its part of that one NF4 tensor, so a part must be made of whole blocks: a tensor-parallel
shard may not cut one (each tp rank's share of a row-parallel layer's inputs a multiple of 64), and
under ZeRO-2/3, where FSDP2 splits each tp shard's rows over dp, dp must split them evenly into whole
blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megaloom.errors import ConfigError

if TYPE_CHECKING:
    from megaloom.config import ModelConfig

BLOCK = 64  # QLoRA's (and torchao's) block of weights that share one absmax scale


def site_shapes(m: ModelConfig) -> list[tuple[str, int, int, int, tuple[int, ...]]]:
    """Each block linear's (site, out features, in features, tp split dim, blocks along it), as
    `parallel/tensor.py parallelize_tensor` splits them: dim 0 column-parallel, dim 1 row-parallel."""
    q, kv = m.heads * m.head_dim, m.n_kv_heads * m.head_dim
    up = (m.ffn, m.ffn) if m.family == "llama" else (m.ffn,)  # SwiGLU's fused [gate; up]
    return [("attn.qkv", q + 2 * kv, m.hidden, 0, (q, kv, kv)), ("attn.proj", m.hidden, q, 1, (q,)),
            ("mlp.up", sum(up), m.hidden, 0, up), ("mlp.down", m.hidden, m.ffn, 1, (m.ffn,))]


def check_nf4_layout(m: ModelConfig, tp: int, dp: int) -> None:
    """One line (ConfigError) when an NF4 base cannot be held in this layout; `dp` is the data-parallel
    size under ZeRO-2/3 (FSDP2 splits the weights), 1 otherwise."""
    for site, out_f, in_f, dim, blocks in site_shapes(m):
        check_site(site, out_f, in_f, dim, blocks, tp, dp)


def check_site(site: str, out_f: int, in_f: int, dim: int, blocks: tuple[int, ...], tp: int, dp: int) -> None:
    """The rules for one (out_f x in_f) weight split over `tp` along `dim` in `blocks`, then its rows
    per tp rank over `dp`, on every rank."""
    if (out_f * in_f) % BLOCK:
        raise ConfigError(numel_message((out_f, in_f)))
    if tp > 1 and any(b % tp for b in blocks):
        raise ConfigError(f"peft.quantize_base = \"nf4\": parallel.tp = {tp} does not divide {site}'s blocks "
                          f"{blocks} evenly; pick a tp that divides them")
    rows, width = (sum(blocks) // tp, in_f) if dim == 0 else (out_f, in_f // tp)
    if tp > 1 and any(not _whole_blocks(_runs(out_f, in_f, dim, blocks, tp, r)) for r in range(tp)):
        raise ConfigError(f"peft.quantize_base = \"nf4\" with parallel.tp = {tp}: a rank holds {rows} x {width} of "
                          f"{site}'s {out_f} x {in_f} weight, which cuts NF4's blocks of {BLOCK}; use model sizes "
                          f"whose per-rank share of every layer's inputs is a multiple of {BLOCK}")
    if rows % dp or (rows // dp * width) % BLOCK:
        raise ConfigError(f"peft.quantize_base = \"nf4\" with parallel.zero 2/3 splits {site}'s {rows} rows "
                          f"(per tp rank) over parallel.dp = {dp}; NF4 parts must be even and of whole blocks of "
                          f"{BLOCK}: pick a dp that divides {rows}")


def numel_message(shape: tuple[int, ...]) -> str:
    n = 1
    for s in shape:
        n *= s
    return (f"peft.quantize_base = \"nf4\" quantizes blocks of {BLOCK} weights, but a base weight of shape "
            f"{tuple(shape)} has {n} elements; use model sizes that are multiples of {BLOCK}")


def _runs(out_f: int, in_f: int, dim: int, blocks: tuple[int, ...], tp: int, rank: int) -> list[tuple[int, int]]:
    """Tp rank `rank`'s part of the weight as runs of consecutive elements of the whole (row-major)
    weight, in the part's order: (start in the whole, length). Column-parallel: a run of whole rows per
    block; row-parallel: a run per row. The row-parallel runs repeat with the row (starts r·in_f + c0),
    so whether they are whole blocks is decided by the first two rows."""
    if dim == 0:
        out, at = [], 0
        for b in blocks:
            e = b // tp
            out.append(((at + rank * e) * in_f, e * in_f))
            at += b
    elif tp == 1:
        out = [(0, out_f * in_f)]
    else:
        w = in_f // tp
        out = [(r * in_f + rank * w, w) for r in range(min(out_f, 2))]
    merged: list[tuple[int, int]] = []
    for start, length in out:  # adjacent runs are one
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        elif length:
            merged.append((start, length))
    return merged


def _whole_blocks(runs: list[tuple[int, int]]) -> bool:
    """Whether the part made of `runs` is whole blocks of the whole weight: every run starts at a block
    boundary both of the whole and of the part (a block across two runs would span a gap), the part a
    whole number of blocks."""
    at = 0
    for start, length in runs:
        if at % BLOCK or start % BLOCK:
            return False
        at += length
    return at % BLOCK == 0
