"""On-disk formats of compressed models, both megaloom checkpoint directories (train/checkpoint.py:
DCP files, config.toml, manifest.json with checksums, tokenizer/ beside them).

Quantized (`megaloom quantize`): every high-precision tensor under its usual `model/<name>`; each
quantized weight as the fields of its torchao tensor in the full layer's shape, `quant/<name>/qdata`
(int8; int4 values packed two to a byte along the input features, the low nibble first), `.../scale`,
`.../zero_point`; and one object `quantization` (method, group size, per-layer torchao class and block
size, the layers kept in high precision, sizes). Loading builds the model in any layout, reads only
the slices a rank holds (scales and packed bytes are sharded like their weight; the per-row scale of
a row-parallel layer is whole on every rank) and puts the torchao tensor in place of the weight.

Pruned (`megaloom prune`): a normal weights-only checkpoint (the zeros are in `model/<name>`) plus
`mask/<name>` (bool, True = kept) for every pruned weight, and an object `sparsity`; it loads, trains
and converts like any checkpoint, and `train.keep_sparsity` reads the masks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megaloom.compress.quantize import block_linears
from megaloom.config import Config, to_toml
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import ConfigError
from megaloom.parallel.shard import ShardSpec
from megaloom.train.checkpoint import check_model_keys, load, saved_keys, write_directory
from megaloom.train.sharded_state import Piece, Sharded, model_entries, named_parameters, spec_pieces

QUANTIZATION = "quantization"
SPARSITY = "sparsity"


# --------------------------------------------------------------------------------------- int4 packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in -8..7, (rows, cols) with cols even -> uint8 (rows, cols / 2), low nibble first."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`."""
    nibbles = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1).to(torch.int16)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


# ------------------------------------------------------------------------------------------- saving


def quant_fields(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors to store of a torchao weight, and what rebuilds it from them."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    if isinstance(weight, IntxUnpackedToInt8Tensor) and weight.target_dtype == torch.int4:
        fields = {"qdata": pack_int4(weight.qdata), "scale": weight.scale, "zero_point": weight.zero_point}
        act = weight.activation_quantization  # int8-dynamic-act-int4-weight: "int8_asym_per_token"
        return fields, {"kind": "int4", "block_size": list(weight.block_size), "dtype": str(weight.dtype)[6:],
                        "activation_quantization": None if act is None else str(getattr(act, "value", act))}
    if isinstance(weight, Int8Tensor):
        fields = {"qdata": weight.qdata, "scale": weight.scale}
        if weight.zero_point is not None:
            fields["zero_point"] = weight.zero_point
        return fields, {"kind": "int8", "block_size": list(weight.block_size), "dtype": str(weight.dtype)[6:],
                        "act_quant_kwargs": weight.act_quant_kwargs}
    raise TypeError(f"no on-disk format for a {type(weight).__name__} weight")


def save_quantized(model: nn.Module, cfg: Config, tokenizer: Tokenizer | None, out: Path, record: dict) -> dict:
    """Write the quantized single-process `model` to checkpoint directory `out`; returns the record."""
    layers, state = {}, {}
    for lin in block_linears(model):
        w = lin.module.weight
        if not hasattr(w, "qdata"):
            continue
        fields, meta = quant_fields(w)
        for key, t in fields.items():
            state[f"quant/{lin.name}/{key}"] = Sharded(tuple(t.shape), [Piece(t.contiguous(), (0,) * t.dim())])
        layers[lin.name] = {**meta, "shape": list(w.shape),
                            "tensors": {k: [list(t.shape), str(t.dtype)[6:]] for k, t in fields.items()}}
    for name, p in named_parameters(model):
        if name not in layers:
            state[f"model/{name}"] = Sharded(tuple(p.shape), [Piece(p.detach(), (0,) * p.dim())])
    record = {**record, "layers": layers}
    state[QUANTIZATION] = record
    write_directory(Path(out), state, to_toml(cfg), step=0, layout={"weights_only": True, "quantized": record["method"]})
    if tokenizer is not None:
        tokenizer.save(Path(out) / "tokenizer")
    return record


def save_pruned(model: nn.Module, cfg: Config, tokenizer: Tokenizer | None, out: Path, masks: dict[str, torch.Tensor],
                record: dict) -> None:
    """A weights-only checkpoint of the pruned single-process `model`, with its keep-masks."""
    state: dict = model_entries(model)
    for name, mask in masks.items():
        state[f"mask/{name}"] = Sharded(tuple(mask.shape), [Piece(mask.contiguous(), (0,) * mask.dim())])
    state[SPARSITY] = record
    write_directory(Path(out), state, to_toml(cfg), step=0, layout={"weights_only": True, "pruned": record["method"]})
    if tokenizer is not None:
        tokenizer.save(Path(out) / "tokenizer")


# ------------------------------------------------------------------------------------------ loading


def is_quantized(ckpt: Path) -> bool:
    return QUANTIZATION in saved_keys(ckpt)


def read_object(ckpt: Path, key: str, group: dist.ProcessGroup | None = None):  # noqa: ANN201
    return load(ckpt, {key: None}, group)[key]


def _field_spec(spec: ShardSpec | None, shape: tuple[int, ...], name: str) -> ShardSpec | None:
    """How a rank holds a stored field of shape `shape` of a weight held as `spec`: split along the same
    dim, block by block, in proportion (a scale has one column per group, packed qdata half the
    columns); a field that is one column wide along a split dim is the same on every rank."""
    if spec is None or spec.size == 1:
        return None
    d = spec.dim
    if shape[d] == 1:
        return None
    ratio, rem = divmod(spec.full_shape[d], shape[d])
    blocks = tuple(b // ratio for b in spec.blocks)
    if rem or any(b % ratio or (b // ratio) % spec.size for b in spec.blocks):
        raise ConfigError(f"the quantized {name} cannot be split over tp = {spec.size}: its groups (or packed "
                          f"int4 bytes) straddle the ranks' shares of its {spec.full_shape[d]} input features; "
                          f"quantize with a --group-size that divides {spec.full_shape[d] // spec.size}, or load "
                          f"it at another --tp")
    return ShardSpec(tuple(shape), d, blocks, spec.rank, spec.size)


def _local_shape(shape: tuple[int, ...], spec: ShardSpec | None) -> tuple[int, ...]:
    if spec is None:
        return tuple(shape)
    out = list(shape)
    out[spec.dim] = sum(b // spec.size for b in spec.blocks)
    return tuple(out)


def _rebuild(meta: dict, fields: dict[str, torch.Tensor], local_in: int):  # noqa: ANN202
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    block = (meta["block_size"][0], min(meta["block_size"][1], local_in))  # a per-row block of a row shard
    dtype = getattr(torch, meta["dtype"])
    if meta["kind"] == "int4":
        qdata = unpack_int4(fields["qdata"])
        act = meta.get("activation_quantization")
        if act is not None:
            from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
                IntxUnpackedToInt8TensorActivationQuantization as ActQuant,
            )

            act = ActQuant(act)
        return IntxUnpackedToInt8Tensor(qdata, fields["scale"], fields["zero_point"], torch.int4, block, dtype, act)
    return Int8Tensor(fields["qdata"], fields["scale"], list(block), dtype, zero_point=fields.get("zero_point"),
                      act_quant_kwargs=meta["act_quant_kwargs"])


def fill_quantized(model: nn.Module, ckpt: Path, group: dist.ProcessGroup | None = None) -> dict:
    """Fill `model` (whole, tensor-parallel shards, pipeline chunks) from quantized checkpoint `ckpt`:
    high-precision tensors in place, torchao tensors in place of the quantized weights. Collective
    over `group`. Returns the checkpoint's quantization record."""
    record = read_object(ckpt, QUANTIZATION, group)
    layers = record["layers"]
    state = {k: v for k, v in model_entries(model).items() if k[len("model/"):] not in layers}
    check_model_keys(ckpt, state, group)
    pending = []
    for lin in block_linears(model):
        meta = layers.get(lin.name)
        if meta is None:
            continue
        spec = getattr(lin.module.weight, "shard_spec", None)
        fields = {}
        for key, (shape, dtype) in meta["tensors"].items():
            sub = _field_spec(spec, tuple(shape), lin.name)
            buf = torch.empty(_local_shape(tuple(shape), sub), dtype=getattr(torch, dtype))
            state[f"quant/{lin.name}/{key}"] = Sharded(tuple(shape), spec_pieces(buf, (0,) * buf.dim(), sub))
            fields[key] = buf
        pending.append((lin, meta, fields))
    with torch.no_grad():
        load(ckpt, state, group)
    for lin, meta, fields in pending:
        device = lin.module.weight.device
        w = _rebuild(meta, {k: v.to(device) for k, v in fields.items()}, lin.module.weight.shape[1])
        lin.module.weight = nn.Parameter(w, requires_grad=False)
    return record


def load_quantized_parallel(path: str | Path, grid, device: torch.device,  # noqa: ANN001 (ProcessGrid)
                            overrides: list[str] | tuple[str, ...] = ()):  # noqa: ANN201
    """`interop.load_parallel_model` for a quantized checkpoint: (ParallelModel, Tokenizer, Config). Collective."""
    from megaloom.interop.load import resolve, tokenizer_of
    from megaloom.train.assemble import build_parallel_model

    cfg, ckpt = resolve(path, overrides)
    if cfg.parallel.zero == 3:
        raise ConfigError("a quantized model does not load under ZeRO-3 (FSDP2 shards plain tensors); use parallel.zero=0")
    pm = build_parallel_model(cfg, grid, device, trainable=False)
    group = dist.new_group(backend="gloo") if dist.is_initialized() and grid.world_size > 1 else None
    fill_quantized(pm.model, ckpt, group)
    pm.model.eval()
    return pm, tokenizer_of(path, ckpt), cfg


def load_quantized(path: str | Path, overrides: list[str] | tuple[str, ...] = ()):  # noqa: ANN201
    """The single-process model of a quantized checkpoint, its tokenizer and config."""
    from megaloom.interop.load import resolve, tokenizer_of
    from megaloom.model.transformer import Transformer

    cfg, ckpt = resolve(path, overrides)
    model = Transformer(cfg.model)
    fill_quantized(model, ckpt)
    return model.eval(), tokenizer_of(path, ckpt), cfg
