"""Weight quantization of a model as it is held, whole or as this rank's tensor-parallel shards.

Round to nearest is torchao's `quantize_` applied to each linear of the transformer blocks; only the
scales of a row-parallel layer need a word. torchao chooses a scale from the block of weights that
shares it: per group of input features, or per output row. A column-parallel rank holds whole rows,
and a group that lies inside one rank's input features (checked) is whole too, so quantizing the shard
gives exactly the shard of the full layer's quantization. A per-row scale of a row-parallel layer spans
every rank's input features: each rank's row minimum and maximum are all-reduced over tp first (exact:
a min and a max), and torchao's own qparams function turns them into the full row's scale.

The embedding and the head stay in high precision (the issue's default, and what GPTQ and torchao's
LLM recipes do).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megaloom.compress.schemes import Method, QuantScheme
from megaloom.parallel.comm import TPGroup
from megaloom.train.sharded_state import chunks_of

LINEARS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")
ROW_PARALLEL = ("attn.proj", "mlp.down")  # their input features are split over tp (parallel/tensor.py)


@dataclass
class Linear:
    name: str  # canonical parameter name, e.g. layers.3.attn.qkv.weight
    module: nn.Module  # nn.Linear, or its Column/RowParallelLinear replacement
    row_parallel: bool

    @property
    def in_features(self) -> int:
        spec = getattr(self.module.weight, "shard_spec", None)
        return spec.full_shape[1] if spec is not None else self.module.weight.shape[1]


def block_linears(model: nn.Module) -> Iterator[Linear]:
    """The linears of every transformer block this rank holds (pipeline chunks included)."""
    for chunk in chunks_of(model):
        for i, block in chunk.layers.items():
            for path in LINEARS:
                module = block.get_submodule(path)
                yield Linear(f"layers.{i}.{path}.weight", module, path in ROW_PARALLEL)


def check_scheme(model: nn.Module, scheme: QuantScheme, tp: TPGroup | None = None) -> None:
    """Every group tiles its layer's input features (per rank for row-parallel layers), before any work."""
    size = tp.size if tp is not None else 1
    for lin in block_linears(model):
        scheme.check_width(lin.name, lin.in_features, size, lin.row_parallel)


def quantize_model(model: nn.Module, scheme: QuantScheme, tp: TPGroup | None = None) -> list[str]:
    """Round-to-nearest quantization of every block linear of `model`, in place (torchao `quantize_`).
    Under tensor parallelism each rank quantizes its shards; the result equals, shard by shard, the
    quantization of the full layer (module docstring). Returns the quantized parameter names."""
    from torchao.quantization import quantize_

    if scheme.method is Method.GPTQ:
        raise ValueError("GPTQ needs calibration data: megaloom.compress.gptq, through `megaloom quantize`")
    check_scheme(model, scheme, tp)
    config = scheme.torchao_config()
    names = []
    for lin in block_linears(model):
        hp = lin.module.weight.detach()
        quantize_(lin.module, config, filter_fn=lambda m, fqn: fqn == "")
        if lin.row_parallel and tp is not None and tp.size > 1 and scheme.group_size is None:
            _full_row_scales(lin.module, hp, tp)
        names.append(lin.name)
    return names


def _full_row_scales(module: nn.Module, hp: torch.Tensor, tp: TPGroup) -> None:
    """Re-quantize a row-parallel int8 shard with the scales of the full rows (module docstring)."""
    from torchao.quantization import PerRow
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    q = module.weight
    lo, hi = hp.amin(dim=1), hp.amax(dim=1)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=tp.group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=tp.group)
    # the same call Int8Tensor.from_hp makes, on a (rows, 2) tensor whose row extremes are the full rows'
    scale, zero = choose_qparams_affine(torch.stack([lo, hi], dim=1), MappingType.SYMMETRIC, (1, 2), torch.int8,
                                        quant_min=-128, quant_max=127, scale_dtype=torch.float32,
                                        zero_point_dtype=torch.int8, keepdim=True,
                                        eps=torch.finfo(torch.float32).eps)
    new = Int8Tensor.from_hp(hp, PerRow(), scale=scale, zero_point=zero, act_quant_kwargs=q.act_quant_kwargs)
    module.weight = nn.Parameter(new, requires_grad=False)
