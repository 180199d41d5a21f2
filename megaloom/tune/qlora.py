"""QLoRA (Dettmers et al. 2023): the frozen base linears held in 4-bit NormalFloat, through torchao's
NF4Tensor (`torchao.quantization.to_nf4`): blocks of 64 weights share one absmax scale, and the scales
are themselves quantized to 8 bits in blocks of 256 ("double quantization", §3). NF4Tensor dequantises
for `F.linear`, forward and backward, in the input's dtype; the adapters stay in the training precision.

Each rank quantizes its own tensor-parallel shard of a weight (its blocks of 64 then differ from the
single-device model's where a shard boundary cuts a block; with the usual sizes, multiples of 64 per
row, they do not)."""

from __future__ import annotations

import torch
from torch import nn

from megaloom.errors import ConfigError

BLOCK, SCALER_BLOCK = 64, 256  # QLoRA's and torchao's defaults
SITES = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")


def scaler_block(n_blocks: int) -> int:
    """torchao's 256 scales per double-quantization block, or the largest divisor of the block count
    below it (tiny test models have fewer than 256 blocks in a weight)."""
    return max(d for d in range(1, min(SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (fp32/bf16) as torchao's NF4Tensor."""
    from torchao.quantization import to_nf4 as torchao_nf4

    n = weight.numel()
    if n % BLOCK:
        raise ConfigError(f"peft.quantize_base = \"nf4\" quantizes blocks of {BLOCK} weights, but a base weight of "
                          f"shape {tuple(weight.shape)} has {n} elements; use model sizes that are multiples of 64")
    return torchao_nf4(weight.detach().contiguous(), BLOCK, scaler_block(n // BLOCK))


@torch.no_grad()
def quantize_base(chunk: nn.Module) -> int:
    """Replace the weight of every block linear of `chunk` (frozen) by its NF4 version; the count."""
    done = 0
    for block in chunk.layers.values():
        for site in SITES:
            owner, attr = site.split(".")
            linear = getattr(getattr(block, owner), attr)
            w = linear.weight
            if hasattr(w, "get_original_weight"):  # already NF4 (a second call)
                continue
            spec = getattr(w, "shard_spec", None)
            linear.weight = nn.Parameter(to_nf4(w), requires_grad=False)
            if spec is not None:
                linear.weight.shard_spec = spec
            done += 1
    return done
