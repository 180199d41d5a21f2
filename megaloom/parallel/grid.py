"""The process grid: which rank holds which slice of the model, and the groups they talk in.

PTD-P (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", §2, §3.1) lays n = t·p·d processes out as a grid of tensor-parallel size t,
pipeline-parallel size p and data-parallel size d. Megatron orders ranks with the tensor-parallel
rank varying fastest, then the data-parallel rank, then the pipeline stage:

    rank = pp_rank·(dp·tp) + dp_rank·tp + tp_rank

so a tensor-parallel group is tp consecutive ranks. Launchers number the GPUs of one server
consecutively, so those groups stay inside a node, where their per-layer all-reduces (8·b·s·h·(t-1)/t
bytes per layer and micro-batch, §3.2) run over NVLink; pipeline stages, which only exchange b·s·h
point-to-point per micro-batch, are the ones that cross nodes (Takeaway #1, §3.2).

The arithmetic here is pure (testable without processes); `ProcessGrid.build` adds the
torch.distributed groups. The grid is built once and passed explicitly: no module-level groups.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from types import MappingProxyType

import torch.distributed as dist

from megaloom.config import ConfigError, ModelConfig, ParallelConfig
from megaloom.layout import check_vocab_rows


class Axis(enum.Enum):
    """A grid axis. MP is the model-parallel group: the tp x pp ranks of one data-parallel replica."""

    TP = "tp"
    DP = "dp"
    PP = "pp"
    MP = "mp"

    @property
    def varies(self) -> tuple[str, ...]:
        """The coordinates that differ inside one group of this axis; the others are shared."""
        return ("tp", "pp") if self is Axis.MP else (self.value,)


@dataclass(frozen=True)
class Coords:
    """A rank's position on each axis."""

    tp: int
    dp: int
    pp: int


# ---------------------------------------------------------------- pure rank arithmetic


def coords(rank: int, tp: int, pp: int, dp: int) -> Coords:
    """The (tp, dp, pp) coordinates of `rank`; tp varies fastest, then dp, then pp."""
    _require_positive(tp, pp, dp)
    world = tp * pp * dp
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1} of a tp={tp} x pp={pp} x dp={dp} grid")
    return Coords(tp=rank % tp, dp=rank // tp % dp, pp=rank // (tp * dp))


def rank_of(c: Coords, tp: int, pp: int, dp: int) -> int:
    """Inverse of `coords`."""
    _require_positive(tp, pp, dp)
    if not (0 <= c.tp < tp and 0 <= c.dp < dp and 0 <= c.pp < pp):
        raise ValueError(f"{c} is outside a tp={tp} x pp={pp} x dp={dp} grid")
    return c.pp * (dp * tp) + c.dp * tp + c.tp


def group_of(rank: int, axis: Axis, tp: int, pp: int, dp: int) -> list[int]:
    """The ranks of `rank`'s group on `axis`, ascending."""
    here = coords(rank, tp, pp, dp)
    sizes = {"tp": tp, "pp": pp, "dp": dp}
    spans = [range(sizes[name]) for name in axis.varies]
    members = (replace(here, **dict(zip(axis.varies, point))) for point in itertools.product(*spans))
    return sorted(rank_of(c, tp, pp, dp) for c in members)


def group_ranks(axis: Axis, tp: int, pp: int, dp: int) -> list[list[int]]:
    """Every group of `axis`, ordered by lowest rank: the same list on every rank.

    A group's lowest rank is the one whose varying coordinates are all 0.
    """
    firsts = (r for r in range(tp * pp * dp) if _is_group_head(coords(r, tp, pp, dp), axis))
    return [group_of(r, axis, tp, pp, dp) for r in firsts]


def _is_group_head(c: Coords, axis: Axis) -> bool:
    return all(getattr(c, name) == 0 for name in axis.varies)


# ---------------------------------------------------------------- validation


def validate_sizes(tp: int, pp: int, dp: int, world_size: int, model: ModelConfig | None = None) -> None:
    """Raise `ConfigError` (one line, the numbers and a valid alternative) for a grid that cannot work."""
    _require_positive(tp, pp, dp)
    if world_size < 1:
        raise ConfigError(f"the world size is {world_size} processes; launch at least 1")
    if tp * pp * dp != world_size:
        raise ConfigError(f"parallel.tp ({tp}) x parallel.pp ({pp}) x parallel.dp ({dp}) = {tp * pp * dp} "
                          f"but the world size is {world_size} processes; {_suggest_layout(tp, pp, world_size, model)}")
    if model is not None:
        _validate_model(model, tp, pp, world_size)


def _require_positive(tp: int, pp: int, dp: int) -> None:
    for name, size in (("tp", tp), ("pp", pp), ("dp", dp)):
        if size < 1:
            raise ConfigError(f"parallel.{name} = {size} must be at least 1; try parallel.{name}=1")


def _validate_model(m: ModelConfig, tp: int, pp: int, world_size: int) -> None:
    """Tensor parallelism splits heads, kv heads, vocabulary rows (padded) and MLP columns over tp ranks (§2.3);
    pipeline parallelism gives each of the pp stages the same number of layers (§2.2)."""
    for name, value in (("model.heads", m.heads), ("model.kv_heads", m.n_kv_heads)):
        if value % tp:
            raise ConfigError(f"{name} ({value}) must be divisible by parallel.tp ({tp}); "
                              f"valid tp values: {_listed(_tp_choices(m, world_size // pp))}")
    check_vocab_rows(m.vocab_size, tp)  # any V: the last shard is padded (megaloom/parallel/shard.py)
    if m.ffn % tp:
        ffn = f"{m.ffn_hidden}, effective {m.ffn}" if m.ffn_hidden != m.ffn else f"{m.ffn}"
        raise ConfigError(f"model.ffn_hidden ({ffn}) must be divisible by parallel.tp ({tp}); "
                          f"valid tp values: {_listed(_tp_choices(m, world_size // pp))}")
    if m.layers % pp:
        raise ConfigError(f"model.layers ({m.layers}) must be divisible by parallel.pp ({pp}); "
                          f"valid pp values: {_listed(_pp_choices(m, world_size // tp))}")


def _suggest_layout(tp: int, pp: int, world_size: int, model: ModelConfig | None) -> str:
    """The smallest change to (tp, pp, dp) whose product is the world size: dp alone if it can be."""
    if world_size % (tp * pp) == 0:
        return f"try parallel.dp={world_size // (tp * pp)}"
    if world_size % pp == 0:
        t = _nearest(tp, _tp_choices(model, world_size // pp))
        return f"try parallel.tp={t} and parallel.dp={world_size // (t * pp)}"
    p = _nearest(pp, _pp_choices(model, world_size))
    t = _nearest(tp, _tp_choices(model, world_size // p))
    return f"try parallel.tp={t}, parallel.pp={p} and parallel.dp={world_size // (t * p)}"


def _tp_choices(model: ModelConfig | None, room: int) -> list[int]:
    """tp values that divide `room` (so dp is whole) and every quantity tp splits; 1 always qualifies.
    The vocabulary is left out: any t splits it, padding the last shard."""
    split = () if model is None else (model.heads, model.n_kv_heads, model.ffn)
    return [t for t in _divisors(room) if all(q % t == 0 for q in split)]


def _pp_choices(model: ModelConfig | None, room: int) -> list[int]:
    return [p for p in _divisors(room) if model is None or model.layers % p == 0]


def _listed(values: list[int]) -> str:
    return ", ".join(map(str, values))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(want: int, options: list[int]) -> int:
    return min(options, key=lambda x: (abs(x - want), x))


# ---------------------------------------------------------------- the grid object


@dataclass(frozen=True)
class ProcessGrid:
    """Sizes, this rank's coordinates and its process groups; build it once and pass it explicitly.

    Constructed directly it is a layout only (no groups): asking it for the group of an axis of size
    > 1 raises, so a missing group never turns a collective into a silent no-op. Size-1 axes without a
    group answer None, which callers treat as "nothing to communicate".
    """

    tp: int
    pp: int
    dp: int
    rank: int = 0
    groups: Mapping[Axis, dist.ProcessGroup] = field(default_factory=lambda: MappingProxyType({}), repr=False, compare=False)

    def __post_init__(self) -> None:
        coords(self.rank, self.tp, self.pp, self.dp)  # validates sizes and rank

    @classmethod
    def build(cls, tp: int, pp: int, dp: int, *, rank: int | None = None, world_size: int | None = None,
              model: ModelConfig | None = None) -> ProcessGrid:
        """Validate, then create every group of every axis (when torch.distributed is initialized)."""
        initialized = dist.is_available() and dist.is_initialized()
        rank, world_size = _resolve_rank(rank, world_size, initialized)
        validate_sizes(tp, pp, dp, world_size, model)
        if not initialized:
            if world_size > 1:
                raise RuntimeError(f"torch.distributed is not initialized but the grid has {world_size} ranks; "
                                   f"launch with torchrun --nproc-per-node={world_size}")
            return cls(tp, pp, dp, rank=rank)
        return cls(tp, pp, dp, rank=rank, groups=MappingProxyType(_new_groups(rank, tp, pp, dp)))

    @classmethod
    def from_config(cls, parallel: ParallelConfig, model: ModelConfig, rank: int | None = None,
                    world_size: int | None = None) -> ProcessGrid:
        return cls.build(parallel.tp, parallel.pp, parallel.dp, rank=rank, world_size=world_size, model=model)

    # -------------------------------------------------------- sizes and coordinates

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def coords(self) -> Coords:
        return coords(self.rank, self.tp, self.pp, self.dp)

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    def size(self, axis: Axis) -> int:
        return {Axis.TP: self.tp, Axis.DP: self.dp, Axis.PP: self.pp, Axis.MP: self.tp * self.pp}[axis]

    def ranks(self, axis: Axis) -> list[int]:
        """Global ranks of this rank's group on `axis`, ascending."""
        return group_of(self.rank, axis, self.tp, self.pp, self.dp)

    # -------------------------------------------------------- groups

    def group(self, axis: Axis) -> dist.ProcessGroup | None:
        if axis in self.groups:
            return self.groups[axis]
        if self.size(axis) == 1:
            return None
        raise RuntimeError(f"this grid is a layout only: it has no {axis.value} group of size {self.size(axis)}; "
                           "create it with ProcessGrid.build after torch.distributed.init_process_group")

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.group(Axis.TP)

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.group(Axis.DP)

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.group(Axis.PP)

    @property
    def mp_group(self) -> dist.ProcessGroup | None:
        return self.group(Axis.MP)

    # -------------------------------------------------------- pipeline neighbours

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def next_stage_rank(self) -> int | None:
        """Global rank of the same (tp, dp) position one stage later; activations go there (§2.2)."""
        return None if self.is_last_stage else self._stage_rank(self.pp_rank + 1)

    @property
    def prev_stage_rank(self) -> int | None:
        return None if self.is_first_stage else self._stage_rank(self.pp_rank - 1)

    def _stage_rank(self, stage: int) -> int:
        return rank_of(replace(self.coords, pp=stage), self.tp, self.pp, self.dp)

    # -------------------------------------------------------- printing

    def describe(self) -> str:
        """Sizes, the rank-order rule and every group per axis, for the start-up log."""
        c = self.coords
        lines = [
            f"process grid: tp={self.tp} x pp={self.pp} x dp={self.dp} = {self.world_size} ranks; "
            f"this is rank {self.rank} (tp_rank={c.tp}, dp_rank={c.dp}, pp_rank={c.pp})",
            "rank order: rank = pp_rank*(dp*tp) + dp_rank*tp + tp_rank (tp fastest: a tp group is tp consecutive ranks)",
        ]
        for axis in Axis:
            groups = " ".join(str(g) for g in group_ranks(axis, self.tp, self.pp, self.dp))
            lines.append(f"{axis.value} groups: {groups}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ProcessGrid(tp={self.tp}, pp={self.pp}, dp={self.dp}, rank={self.rank})"


def _resolve_rank(rank: int | None, world_size: int | None, initialized: bool) -> tuple[int, int]:
    """Rank and world size from torch.distributed when it runs (checked against any given), else 0 of 1."""
    if not initialized:
        return (0 if rank is None else rank), (1 if world_size is None else world_size)
    actual = dist.get_rank(), dist.get_world_size()
    given = (actual[0] if rank is None else rank), (actual[1] if world_size is None else world_size)
    if given != actual:
        raise ValueError(f"rank {given[0]} of {given[1]} was given but torch.distributed runs this process "
                         f"as rank {actual[0]} of {actual[1]}")
    return actual


_TIMEOUT: list[timedelta | None] = [None]


def set_group_timeout(timeout: timedelta) -> None:
    """The timeout of every group created from now on. torch's new_group does not inherit the world
    group's timeout (it falls back to 30 minutes), so a hung peer would go unnoticed on sub-groups."""
    _TIMEOUT[0] = timeout


def new_group(ranks: list[int], backend: str | None = None) -> dist.ProcessGroup:
    return dist.new_group(ranks, timeout=_TIMEOUT[0], backend=backend)


def _new_groups(rank: int, tp: int, pp: int, dp: int) -> dict[Axis, dist.ProcessGroup]:
    """new_group is collective over the whole world: every rank creates every group, in the same
    order, and keeps the ones it is in."""
    mine: dict[Axis, dist.ProcessGroup] = {}
    for axis in Axis:
        for ranks in group_ranks(axis, tp, pp, dp):
            group = new_group(ranks)
            if rank in ranks:
                mine[axis] = group
    return mine
