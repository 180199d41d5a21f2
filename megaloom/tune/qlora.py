"""QLoRA (Dettmers et al. 2023): the frozen base linears held in 4-bit NormalFloat, through torchao's
NF4Tensor (`torchao.quantization.to_nf4`): blocks of 64 weights share one absmax scale, and the scales
are themselves quantized to 8 bits in blocks of 256 ("double quantization", §3): each scale is stored
as round((s - mean) · f) with `mean` the mean of *all* the weight's scales and `f` one factor per group
of 256 scales. NF4Tensor dequantises for `F.linear`, forward and backward, in the input's dtype; the
adapters stay in the training precision.

The quantization is layout independent: every weight is quantized whole, as the single-device model
holds it, and each rank keeps its part of that one NF4 tensor (the same 4-bit codes, block scales and
mean), so every (t, p, d, ZeRO) layout computes with the same dequantised base. Quantizing each rank's
shard by itself would not do: the mean, and with it every dequantised scale, would be the shard's.
A part must be made of whole blocks of 64 (a tensor-parallel split may not cut one: each tp rank's
share of a row-parallel layer's inputs is a multiple of 64); its groups of scales are runs of g blocks
inside one group of the whole tensor (g divides the group size, each run keeps its group's factor;
g = 1 at worst, one factor per block). Under ZeRO-2/3, FSDP2 has already split every weight over dp
(dim 0): the NF4 part of this rank's rows replaces the FSDP parameter's local tensor, and FSDP2
all-gathers the NF4 parts through NF4Tensor's own `fsdp_pre_all_gather` / `fsdp_post_all_gather`
(4-bit codes, not fp32, cross the network). That needs even dp parts of whole runs of g blocks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaloom.errors import ConfigError
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.shard import ShardSpec
from megaloom.tune.lora import SITES, block_linears
from megaloom.tune.nf4_layout import BLOCK, check_site, numel_message
from megaloom.tune.peft import dp_slices, whole

SCALER_BLOCK = 256  # torchao's default (BLOCK, 64: nf4_layout.py)


def scaler_block(n_blocks: int) -> int:
    """torchao's 256 scales per double-quantization block, or the largest divisor of the block count
    below it (tiny test models have fewer than 256 blocks in a weight)."""
    return max(d for d in range(1, min(SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (fp32/bf16), a whole single-device weight, as torchao's NF4Tensor."""
    from torchao.quantization import to_nf4 as torchao_nf4

    n = weight.numel()
    if n % BLOCK:
        raise ConfigError(numel_message(tuple(weight.shape)))
    return torchao_nf4(weight.detach().contiguous(), BLOCK, scaler_block(n // BLOCK))


@torch.no_grad()
def quantize_base(chunk: nn.Module, tp: TPGroup | None = None) -> int:
    """Replace the weight of every block linear of `chunk` (frozen) by this rank's part of the NF4
    version of the whole weight; the count. Collective over tp and, under ZeRO-2/3, dp: every rank
    quantizes the same weights in the same order."""
    tp = tp if tp is not None and tp.size > 1 else None
    done = 0
    for block in chunk.layers.values():
        for site in SITES:
            owner, attr = site.split(".")
            linear = getattr(getattr(block, owner), attr)
            w = linear.weight
            local = w.to_local() if hasattr(w, "to_local") else w
            if hasattr(local, "get_original_weight"):  # already NF4 (a second call)
                continue
            spec: ShardSpec | None = getattr(w, "shard_spec", None)
            if spec is not None and spec.size > 1 and tp is None:
                raise ValueError(f"{site} is a tensor-parallel shard: quantize_base needs the chunk's tp group")
            shard = whole(w)  # this rank's tp shard (ZeRO-2/3: gathered over dp)
            full = _gather_tp(shard, spec, tp) if tp is not None and spec is not None else shard
            nf4 = to_nf4(full)
            if full is shard and not hasattr(w, "device_mesh"):  # one process holds it all
                linear.weight = nn.Parameter(nf4, requires_grad=False)
            else:
                _replace(block, linear, w, nf4, spec if tp is not None else None, site)
            if spec is not None:
                linear.weight.shard_spec = spec
            done += 1
    return done


def dequantize_base(chunk: nn.Module) -> int:
    """The single-process inverse of `quantize_base` (before merging adapters and exporting the base): every
    NF4 block linear weight of `chunk` becomes a plain frozen parameter holding its dequantised value, the
    weight the NF4 run computed with; the count."""
    done = 0
    for _, _, linear in block_linears(chunk):
        if hasattr(linear.weight, "get_original_weight"):  # torchao's NF4Tensor
            linear.weight = nn.Parameter(linear.weight.get_original_weight(), requires_grad=False)
            done += 1
    return done


def _gather_tp(shard: torch.Tensor, spec: ShardSpec, tp: TPGroup) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(tp.size)]
    dist.all_gather(parts, shard.contiguous(), group=tp.group)
    return spec.assemble(parts)


def _replace(block: nn.Module, linear: nn.Module, w: torch.Tensor, nf4: torch.Tensor, spec: ShardSpec | None,
             site: str) -> None:
    """Hold this rank's part of `nf4` (the whole weight) in place of `w`: its tp shard (`spec`), and
    under ZeRO-2/3 (`w` a DTensor) its dp rows of that, swapped into FSDP2's parameter of `block`."""
    out_f, in_f = nf4.shape
    dp = w.device_mesh.size() if hasattr(w, "device_mesh") else 1
    # the rules, and their one-line errors, as config validation checks them before the model is built
    check_site(site, out_f, in_f, spec.dim if spec else 0, spec.blocks if spec else (out_f,), spec.size if spec else 1,
               dp)
    rows, cols = torch.arange(out_f), torch.arange(in_f)
    if spec is not None:  # a 1-D spec over the split dim: which rows (column-parallel) or columns it keeps
        one = ShardSpec((spec.full_shape[spec.dim],), 0, spec.blocks, spec.rank, spec.size)
        rows, cols = (one.take(rows), cols) if spec.dim == 0 else (rows, one.take(cols))
    width, n = len(cols), len(rows) * len(cols) // BLOCK
    # the part's k-th block of 64 must be one block of the whole tensor: its first and last elements
    # 63 apart (rows and columns only grow along the part) and the first at a multiple of 64
    first = torch.arange(n) * BLOCK
    at = rows[first // width] * in_f + cols[first % width]
    last = rows[(first + BLOCK - 1) // width] * in_f + cols[(first + BLOCK - 1) % width]
    if bool((at % BLOCK).any()) or not torch.equal(last - at, torch.full_like(at, BLOCK - 1)):
        raise RuntimeError(f"{site}: this rank's part of the NF4 weight is not whole blocks, yet nf4_layout's "
                           "check let it pass")  # what `_part` relies on
    blocks = at // BLOCK
    g = _run(blocks, nf4.scaler_block_size, n // dp)
    if not hasattr(w, "device_mesh"):
        linear.weight = nn.Parameter(_part(nf4, blocks, g, len(rows), width), requires_grad=False)
        return
    here = dp_slices(w)[0]
    mine = blocks[here.start * width // BLOCK:here.stop * width // BLOCK]
    _swap_fsdp(block, linear, w, _part(nf4, mine, g, here.stop - here.start, width))


def _run(blocks: torch.Tensor, group: int, per_dp: int) -> int:
    """The largest g dividing the whole tensor's group size such that `blocks` is made of runs of g
    consecutive blocks, each starting at a multiple of g (so inside one group), and a dp part holds
    whole runs."""
    for g in sorted((d for d in range(1, group + 1) if group % d == 0), reverse=True):
        if len(blocks) % g or per_dp % g:
            continue
        runs = blocks.view(-1, g)
        if bool((runs[:, 0] % g == 0).all()) and torch.equal(runs, runs[:, :1] + torch.arange(g)):
            return g
    return 1


def _part(nf4: torch.Tensor, blocks: torch.Tensor, g: int, out_f: int, in_f: int) -> torch.Tensor:
    """The NF4Tensor of the blocks `blocks` of `nf4` (in order, `out_f` rows of `in_f`), dequantising
    to exactly the same values: their codes and scales, one factor per run of g blocks (its group's),
    the whole tensor's mean."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, SubclassTensorArgs

    shape = torch.Size((out_f, in_f))
    meta = SubclassTensorArgs(shape, (in_f, 1), 0, nf4.dtype, nf4.device, False)
    blocks = blocks.to(nf4.quantized_data.device)
    data = nf4.quantized_data.view(-1, BLOCK // 2)[blocks].reshape(-1)  # two 4-bit codes a byte
    factor = nf4.quantization_factor[blocks[::g] // nf4.scaler_block_size]
    return NF4Tensor(meta, BLOCK, len(blocks), g, nf4.quantized_scalers[blocks].contiguous(), factor.contiguous(),
                     nf4.scaler_mean, data.contiguous(), nf4.nf4)


def _swap_fsdp(block: nn.Module, linear: nn.Module, w: torch.Tensor, local: torch.Tensor) -> None:
    """Make the NF4 `local` (this dp rank's rows) the local tensor of `linear`'s FSDP2 weight `w`, a
    parameter of the fully_shard unit `block`. FSDP2 re-reads a swapped parameter
    (`reset_sharded_param`, as after load_state_dict(assign=True)) and picks NF4Tensor's all-gather
    extension (`_init_extensions`); its check for an unchanged local tensor compares plain storages
    only, so the NF4 data is put in first (torch 2.13 asks a subclass for its data pointer otherwise)."""
    from torch.distributed.tensor import DTensor

    linear.weight = nn.Parameter(DTensor.from_local(local, w.device_mesh, w.placements, run_check=False,
                                                    shape=w.shape, stride=w.stride()), requires_grad=False)
    found = [p for group in block._get_fsdp_state()._fsdp_param_groups for p in group.fsdp_params
             if p._module_info.module is linear and p._module_info.param_name == "weight"]
    if len(found) != 1:
        raise RuntimeError(f"FSDP2 holds {len(found)} records of an NF4 weight in its block; expected one")
    found[0]._sharded_param_data = local.view(-1)
    found[0].reset_sharded_param()
    found[0]._init_extensions()
