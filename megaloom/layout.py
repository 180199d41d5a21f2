"""One validator for a (t, p, d, ZeRO, schedule) layout of a model: config loading, `megaloom simulate`
and `megaloom plan` accept and refuse exactly the same layouts, because all three call `check_layout`.

Pure arithmetic with no torch and no other megaloom module (the bottom layer, beside `config/`,
which imports it). Errors name the setting as the caller spells it: config keys (`parallel.tp`) for a
TOML file, flags (`--tp`) for the planner's command line (`CONFIG_NAMES`, `FLAG_NAMES`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from megaloom.errors import ConfigError


class ScheduleKind(enum.Enum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"
    ZB_H1 = "zb-h1"


class ModelShape(Protocol):
    """The model dimensions a layout must divide (`config.ModelConfig` has them)."""

    layers: int
    heads: int
    vocab_size: int
    seq_len: int

    @property
    def n_kv_heads(self) -> int: ...


CONFIG_NAMES: Mapping[str, str] = {
    "tp": "parallel.tp", "pp": "parallel.pp", "dp": "parallel.dp", "chunks": "parallel.chunks",
    "zero": "parallel.zero", "schedule": "parallel.schedule", "sequence_parallel": "parallel.sequence_parallel",
    "layers_per_stage": "parallel.layers_per_stage", "microbatch": "train.micro_batch",
    "global_batch": "train.global_batch", "layers": "model.layers", "heads": "model.heads",
    "kv_heads": "model.kv_heads", "vocab": "model.vocab_size", "seq": "model.seq_len",
}
FLAG_NAMES: Mapping[str, str] = {
    "tp": "--tp", "pp": "--pp", "dp": "dp", "chunks": "--chunks", "zero": "--zero",
    "schedule": "--schedule", "sequence_parallel": "--sequence-parallel", "layers_per_stage": "layers_per_stage",
    "microbatch": "--microbatch", "global_batch": "--global-batch", "layers": "--layers", "heads": "--heads",
    "kv_heads": "--kv-heads", "vocab": "--vocab", "seq": "--seq",
}


@dataclass(frozen=True)
class LayoutSpec:
    """A layout as every front end states it."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    chunks: int = 1
    microbatch: int = 1
    global_batch: int = 1
    zero: int = 0
    schedule: str = ""  # "" = "interleaved" when chunks > 1, else "1f1b"
    sequence_parallel: bool = False
    layers_per_stage: tuple[int, ...] = ()

    @property
    def microbatches(self) -> int:
        """Micro-batches per pipeline per step: global batch / (micro-batch x dp)."""
        return self.global_batch // (self.microbatch * self.dp)

    @property
    def schedule_kind(self) -> ScheduleKind:
        return schedule_kind(self.schedule, self.chunks)


def schedule_kind(name: str, chunks: int = 1, names: Mapping[str, str] = CONFIG_NAMES) -> ScheduleKind:
    if not name:
        return ScheduleKind.INTERLEAVED if chunks > 1 else ScheduleKind.ONE_F_ONE_B
    try:
        return ScheduleKind(name)
    except ValueError:
        choices = ", ".join(k.value for k in ScheduleKind)
        raise ConfigError(f"{names['schedule']} = {name!r} is not a schedule; choose one of {choices}") from None


def _microbatches(names: Mapping[str, str]) -> str:
    return f"microbatches = {names['global_batch']} / ({names['microbatch']} x {names['dp']})"


def check_schedule(kind: ScheduleKind | str, p: int, m: int, v: int = 1,
                   names: Mapping[str, str] = CONFIG_NAMES) -> ScheduleKind:
    """The arithmetic a schedule needs (§2.2.2: interleaving needs m to be a multiple of p)."""
    kind = kind if isinstance(kind, ScheduleKind) else schedule_kind(kind, v, names)
    if p < 1:
        raise ConfigError(f"{names['pp']} ({p}) must be >= 1")
    if m < 1:
        raise ConfigError(f"microbatches ({m}) must be >= 1; {_microbatches(names)}")
    if v < 1:
        raise ConfigError(f"{names['chunks']} ({v}) must be >= 1")
    if v > 1 and kind is not ScheduleKind.INTERLEAVED:
        raise ConfigError(f'{names["chunks"]} ({v}) > 1 needs {names["schedule"]} = "interleaved" '
                          f'(got "{kind.value}"); set {names["chunks"]} = 1 or switch the schedule')
    if kind is ScheduleKind.INTERLEAVED and v > 1 and m % p:
        hint = (m // p + 1) * p
        raise ConfigError(f'{names["schedule"]} = "interleaved" needs microbatches ({m}) to be a multiple of '
                          f"{names['pp']} ({p}); {_microbatches(names)}, so change {names['global_batch']} or "
                          f"{names['microbatch']} (e.g. to get {hint} microbatches)")
    return kind


def stage_layers(layers: int, pp: int, chunks: int, layers_per_stage: Sequence[int] | None = None,
                 names: Mapping[str, str] = CONFIG_NAMES) -> list[range]:
    """Global layer ids of each virtual stage (stage s = chunk·pp + rank, as in the paper's Figure 4)."""
    n = pp * chunks
    if layers_per_stage:
        sizes = list(layers_per_stage)
        if len(sizes) != n or sum(sizes) != layers or min(sizes) < 1:
            raise ConfigError(f"{names['layers_per_stage']} = {sizes} must have {names['pp']} x {names['chunks']} "
                              f"= {n} positive entries summing to {names['layers']} ({layers})")
    elif layers < n:
        raise ConfigError(f"{names['layers']} ({layers}) is smaller than {names['pp']} x {names['chunks']} ({n}); "
                          f"every stage needs at least one layer: lower {names['pp']} or {names['chunks']}")
    elif layers % n:
        even = [layers // n + (1 if i < layers % n else 0) for i in range(n)]
        hint = f"set {names['layers_per_stage']} = {even}" if n <= 64 else f"set {names['layers_per_stage']}"
        raise ConfigError(f"{names['layers']} ({layers}) is not divisible by {names['pp']} x {names['chunks']} "
                          f"({n}); {hint} or change the sizes")
    else:
        sizes = [layers // n] * n
    starts = [sum(sizes[:i]) for i in range(n)]
    return [range(s, s + k) for s, k in zip(starts, sizes)]


def vocab_rows(vocab: int, tp: int) -> int:
    """Vocabulary rows each tensor-parallel rank holds of the token embedding and the head: ceil(V/t).

    Rank r holds rows [r·R, (r+1)·R) of the padded vocabulary; the rows at or past V (on the last rank or
    ranks) are padding: zero, never trained, saved, loaded or scored (`megaloom/parallel/shard.py`). Megatron
    pads the vocabulary itself instead, to a multiple of 128·t (`--make-vocab-size-divisible-by`), which
    changes the model; here the model keeps its V rows in every layout."""
    return -(-vocab // tp)


def check_vocab_rows(vocab: int, tp: int, names: Mapping[str, str] = CONFIG_NAMES) -> None:
    """Any V splits over any t, padding the last shard (`vocab_rows`), as long as every rank holds at least
    one real row: with (t-1)·ceil(V/t) >= V the last rank would hold padding only."""
    if vocab < 1 or tp < 1:
        return  # reported as non-positive sizes where they are checked
    if (tp - 1) * vocab_rows(vocab, tp) >= vocab:
        ok = max(x for x in range(1, tp + 1) if (x - 1) * vocab_rows(vocab, x) < vocab)
        raise ConfigError(f"{names['tp']} ({tp}) splits {names['vocab']} ({vocab}) into {vocab_rows(vocab, tp)} rows "
                          f"per rank, which leaves the last rank no real row; try {names['tp']}={ok} or a larger "
                          f"{names['vocab']}")


def check_layout(model: ModelShape, lay: LayoutSpec, names: Mapping[str, str] = CONFIG_NAMES) -> ScheduleKind:
    """Raise one `ConfigError` line for the first thing the layout cannot run; the schedule kind otherwise.

    Tensor parallelism splits heads and key/value heads over t ranks, and the vocabulary rows too, the
    last shard padded when t does not divide V (`vocab_rows`) (§2.3); pipeline
    parallelism splits the layers over p·v virtual stages (§2.2); the batch splits into micro-batches
    over d replicas."""
    for key in ("tp", "pp", "dp", "chunks", "microbatch", "global_batch"):
        if getattr(lay, key) < 1:
            raise ConfigError(f"{names[key]} ({getattr(lay, key)}) must be >= 1")
    t = lay.tp
    for key, value in (("heads", model.heads), ("kv_heads", model.n_kv_heads)):
        if value % t:
            ok = max(x for x in range(1, t + 1) if value % x == 0)
            raise ConfigError(f"{names['tp']} ({t}) must divide {names[key]} ({value}); try {names['tp']}={ok}")
    check_vocab_rows(model.vocab_size, t, names)
    per_step = lay.microbatch * lay.dp
    if lay.global_batch % per_step:
        raise ConfigError(f"{names['global_batch']} ({lay.global_batch}) must be a multiple of {names['microbatch']} "
                          f"({lay.microbatch}) x {names['dp']} ({lay.dp}) = {per_step}; try {names['global_batch']}="
                          f"{per_step * max(1, lay.global_batch // per_step)}")
    if lay.zero not in (0, 1, 2, 3):
        raise ConfigError(f"{names['zero']} = {lay.zero} is not a ZeRO stage; use 0, 1, 2 or 3")
    kind = check_schedule(lay.schedule or schedule_kind("", lay.chunks, names), lay.pp, lay.microbatches, lay.chunks,
                          names)
    if kind is ScheduleKind.ZB_H1 and lay.zero >= 2 and lay.pp > 1:
        # FSDP2 reduce-scatters in its post-backward hook, which fires at the I pass, before zb-h1's
        # deferred W pass has produced the weight gradients (Qi et al. 2023, §3): they would be lost
        raise ConfigError(f'{names["schedule"]} = "zb-h1" defers the weight gradients past the point where '
                          f"{names['zero']} = {lay.zero} (FSDP) reduce-scatters them; use {names['zero']} 0 or 1 "
                          f'with zb-h1, or {names["schedule"]} = "1f1b"')
    if lay.pp > 1 or lay.chunks > 1:
        stage_layers(model.layers, lay.pp, lay.chunks, lay.layers_per_stage or None, names)
    elif lay.layers_per_stage:
        raise ConfigError(f"{names['layers_per_stage']} = {list(lay.layers_per_stage)} needs {names['pp']} > 1")
    if lay.sequence_parallel and model.seq_len % t:
        raise ConfigError(f"{names['sequence_parallel']} splits {names['seq']} ({model.seq_len}) over {names['tp']} "
                          f"({t}); make {names['seq']} a multiple of {t}")
    return kind
