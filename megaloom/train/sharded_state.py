"""This rank's part of the training state, described in layout-independent coordinates.

A checkpoint stores every tensor under its canonical name and full (single-device) shape. What a rank
holds of it is a list of *pieces*: a view into the rank's own memory plus the offset of that view in
the full tensor. Three layouts compose:

- tensor parallelism: a parameter is slice `rank` of `size` of each block along one dim (`ShardSpec`;
  a fused QKV has three blocks, so its shard is three pieces); the padding of a vocabulary that t does
  not divide is in no piece, so a checkpoint holds exactly V rows whatever t wrote it;
- ZeRO-2/3 (FSDP2): the tensor-parallel shard is split again along dim 0 over the dp ranks (a DTensor);
- ZeRO-1: the optimizer state covers a contiguous range of the flattened parameters, which becomes up
  to three rectangles per parameter (a partial first row, whole rows, a partial last row).

torch.distributed.checkpoint (DCP) then does the rest: each piece is one chunk of the saved tensor;
replicas of a chunk (data-parallel copies, the tied embedding of the last pipeline stage) are written
once; on load every rank asks for the chunks it needs now, whatever layout wrote them. The two
planners below are the whole bridge between our pieces and DCP.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megaloom.parallel.comm import local
from megaloom.parallel.data import ShardedAdamW
from megaloom.parallel.shard import ShardSpec


@dataclass
class Piece:
    view: torch.Tensor  # in this rank's memory: saved from, loaded into (in place)
    offsets: tuple[int, ...]  # where it sits in the full tensor


@dataclass
class Sharded:
    """This rank's pieces of one full tensor of shape `shape`."""

    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)

    def add(self, more: list[Piece]) -> None:
        known = {p.offsets for p in self.pieces}  # a rank may hold a replica twice (the tied embedding)
        self.pieces += [p for p in more if p.offsets not in known]

    def to_cpu(self) -> Sharded:
        """A copy on the CPU, for saving in the background while training changes the originals."""
        return Sharded(self.shape, [Piece(p.view.detach().to("cpu", copy=True), p.offsets) for p in self.pieces])


# ---------------------------------------------------------------------------------------------- pieces


def spec_pieces(view: torch.Tensor, start: tuple[int, ...], spec: ShardSpec | None) -> list[Piece]:
    """Pieces of `view`, which sits at `start` inside the tensor-parallel shard described by `spec`.

    Along `spec.dim` the shard is the concatenation of slice `rank` of every block; a view that spans
    several blocks is cut at the block boundaries, each part moved to its place in the full tensor. The
    padding at the end of a slice (`ShardSpec.real`) belongs to no full tensor and makes no piece."""
    if spec is None or spec.size == 1:
        return [Piece(view, tuple(start))]
    d, pieces = spec.dim, []
    local_lo = 0  # where the current block's slice starts inside the shard
    global_lo = 0  # where the current block starts in the full tensor
    for block in spec.blocks:
        per_rank = spec.extent(block)
        lo, hi = max(start[d], local_lo), min(start[d] + view.shape[d], local_lo + spec.real(block))
        if lo < hi:
            part = view.narrow(d, lo - start[d], hi - lo)
            offsets = list(start)
            offsets[d] = global_lo + spec.rank * per_rank + (lo - local_lo)
            pieces.append(Piece(part, tuple(offsets)))
        local_lo += per_rank
        global_lo += block
    return pieces


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    spec: ShardSpec | None = getattr(p, "shard_spec", None)
    return tuple(spec.full_shape) if spec is not None else tuple(p.shape)


def tensor_pieces(p: nn.Parameter, t: torch.Tensor | None = None) -> list[Piece]:
    """Pieces of parameter `p` — or of `t`, a tensor laid out like it (an Adam moment)."""
    t = p if t is None else t
    view = local(t)
    start = (0,) * view.dim()
    if hasattr(t, "device_mesh"):  # FSDP2 split the tensor-parallel shard over dp along dim 0
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, start = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if view.numel() == 0:
        return []
    return spec_pieces(view, tuple(start), getattr(p, "shard_spec", None))


def flat_range_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Rectangles covering elements [lo, hi) of a row-major tensor: (flat start, offsets, sizes)."""
    if len(shape) == 1:
        return [(lo, (lo,), (hi - lo,))] if lo < hi else []
    if len(shape) != 2:
        raise ValueError(f"ZeRO-1 checkpoints handle 1-D and 2-D parameters, not shape {shape}")
    cols, boxes, at = shape[1], [], lo
    while at < hi:
        row, col = divmod(at, cols)
        if col or hi - at < cols:  # a partial row
            n = min(cols - col, hi - at)
            boxes.append((at, (row, col), (1, n)))
        else:  # as many whole rows as fit
            n = (hi - at) // cols * cols
            boxes.append((at, (row, 0), (n // cols, cols)))
        at += n
    return boxes


def flat_pieces(p: nn.Parameter, flat: torch.Tensor, lo: int, hi: int) -> list[Piece]:
    """Pieces of a flat buffer `flat` that holds elements [lo, hi) of parameter `p`'s local shard."""
    out = []
    for at, offsets, sizes in flat_range_boxes(tuple(p.shape), lo, hi):
        n = 1
        for s in sizes:
            n *= s
        view = flat[at - lo:at - lo + n].view(sizes)
        out += spec_pieces(view, offsets, getattr(p, "shard_spec", None))
    return out


# ------------------------------------------------------------------------------------- training state


def chunks_of(model: nn.Module) -> list[nn.Module]:
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return list(model) if isinstance(model, nn.ModuleList) else [model]


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Canonical names: pipeline chunks keep the global layer index, so names are layout-independent."""
    return [(name, p) for chunk in chunks_of(model) for name, p in chunk.named_parameters()]


def model_entries(model: nn.Module, select: Callable[[nn.Parameter], bool] | None = None) -> dict[str, Sharded]:
    """Every parameter's pieces under model/<name>; with `select`, only the parameters it accepts (a PEFT
    run's checkpoints hold the trainable adapters, its pretrained base fills the frozen rest)."""
    out: dict[str, Sharded] = {}
    for name, p in named_parameters(model):
        if select is not None and not select(p):
            continue
        out.setdefault(f"model/{name}", Sharded(full_shape(p))).add(tensor_pieces(p))
    return out


MOMENTS = ("exp_avg", "exp_avg_sq")


def init_optimizer_state(optimizer) -> None:
    """Create Adam's state (zero moments, step 0) before loading into it; torch creates it lazily."""
    inner = optimizer.inner if isinstance(optimizer, ShardedAdamW) else optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            if p in inner.state and inner.state[p]:
                continue
            on_device = group.get("fused") or group.get("capturable")
            step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            inner.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def optimizer_entries(model: nn.Module, optimizer) -> tuple[dict[str, Sharded], float]:
    """Adam's moments under optim/<parameter>/<moment>, in the parameters' full shapes, and the step count."""
    out: dict[str, Sharded] = {}
    names = {id(p): name for name, p in named_parameters(model)}
    if isinstance(optimizer, ShardedAdamW):
        inner = optimizer.inner
        ranges = []  # (start, end, state) of each flat shard the inner optimizer steps
        for group in inner.param_groups:
            for shard in group["params"]:
                start = (shard.data_ptr() - optimizer.flat.data_ptr()) // shard.element_size()  # a slice of flat
                ranges.append((start, start + shard.numel(), inner.state.get(shard, {})))
        for p, offset in optimizer.bounds:
            for start, end, state in ranges:
                lo, hi = max(offset, start), min(offset + p.numel(), end)
                if lo >= hi or not state:
                    continue
                for m in MOMENTS:
                    pieces = flat_pieces(p, state[m][lo - start:hi - start], lo - offset, hi - offset)
                    out.setdefault(f"optim/{names[id(p)]}/{m}", Sharded(full_shape(p))).add(pieces)
        states = [s for _, _, s in ranges if s]
    else:
        states = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state:
                    continue
                states.append(state)
                for m in MOMENTS:
                    out.setdefault(f"optim/{names[id(p)]}/{m}", Sharded(full_shape(p))).add(tensor_pieces(p, state[m]))
    step = float(states[0]["step"]) if states else 0.0
    return out, step


def set_optimizer_step(optimizer, step: float) -> None:
    inner = optimizer.inner if isinstance(optimizer, ShardedAdamW) else optimizer
    for state in inner.state.values():
        if "step" in state:
            state["step"].fill_(step)


# ------------------------------------------------------------------------------------------- planners


def _chunk(piece: Piece) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size(piece.offsets), sizes=piece.view.shape)


class PieceSavePlanner(DefaultSavePlanner):
    """Writes each piece as one chunk of its full tensor; other values as pickled objects. DCP's global
    planning keeps one writer per identical chunk, so replicas are stored once."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, obj in self.state_dict.items():
            if isinstance(obj, Sharded):
                for piece in obj.pieces:
                    items.append(WriteItem(
                        index=MetadataIndex(fqn, piece.offsets), type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(chunk=_chunk(piece),
                                                    properties=TensorProperties.create_from_tensor(piece.view),
                                                    size=torch.Size(obj.shape))))
            else:
                items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, Sharded):
            for piece in obj.pieces:
                if torch.Size(piece.offsets) == index.offset:
                    return piece.view.detach().contiguous()
            raise KeyError(f"no piece of {index.fqn} at {tuple(index.offset)}")
        return obj


class PieceLoadPlanner(DefaultLoadPlanner):
    """Reads, for each piece this rank holds now, the parts of the saved chunks that overlap it,
    straight into the piece's memory. Objects are unpickled into `self.objects`."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.objects: dict[str, Any] = {}

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        requests = []
        saved = self.metadata.state_dict_metadata
        for fqn, obj in self.state_dict.items():
            md = saved[fqn]
            if isinstance(obj, Sharded):
                if isinstance(md, BytesStorageMetadata) or tuple(md.size) != tuple(obj.shape):
                    got = "an object" if isinstance(md, BytesStorageMetadata) else tuple(md.size)
                    raise ValueError(f"'{fqn}' has shape {got} in the checkpoint but {tuple(obj.shape)} in this model")
                requests += create_read_items_for_chunk_list(fqn, md, [_chunk(p) for p in obj.pieces])
            else:
                requests.append(ReadItem(type=LoadItemType.BYTE_IO,
                                         dest_index=MetadataIndex(fqn), dest_offsets=torch.Size((0,)),
                                         storage_index=MetadataIndex(fqn), storage_offsets=torch.Size((0,)),
                                         lengths=torch.Size((0,))))
        return LoadPlan(requests)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.objects[read_item.dest_index.fqn] = torch.load(value, weights_only=False)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        obj: Sharded = self.state_dict[read_item.dest_index.fqn]
        for piece in obj.pieces:
            if torch.Size(piece.offsets) == read_item.dest_index.offset:
                view = piece.view
                for d, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                    view = view.narrow(d, start, length)
                return view
        raise KeyError(f"no piece of {read_item.dest_index.fqn} at {tuple(read_item.dest_index.offset)}")

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # the storage reader copied into the view, i.e. into the rank's own tensor
