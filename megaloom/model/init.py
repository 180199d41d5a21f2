"""Layout-independent initialisation (DESIGN principle 3).

Every parameter is drawn from its own generator, seeded by (seed, canonical name, block). The full
tensor is therefore a pure function of the seed and the name, whatever process holds it: a tensor-
or pipeline-parallel rank builds the full tensor of the parameters it owns and keeps its shard
(`shard` below), and obtains exactly the values of the single-device model.

Fused GEMMs (attention `qkv`, Llama's `[gate; up]`) are drawn block by block so that a tensor-
parallel shard — which takes its slice of *each* block — equals the same rows of the full model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from megaloom.config import ModelConfig
from megaloom.model.layers import residual_std
from megaloom.parallel.shard import ShardSpec


@dataclass(frozen=True)
class InitSpec:
    kind: str  # "normal" | "ones" | "zeros"
    std: float = 0.0
    blocks: tuple[tuple[str, int], ...] = ()  # (block name, rows) of a fused weight, in order


def init_spec(cfg: ModelConfig, name: str) -> InitSpec:
    """How the canonical parameter `name` is initialised."""
    if name.endswith(".bias"):
        return InitSpec("zeros")
    if "norm" in name.split(".")[-2]:
        return InitSpec("ones")
    if name.endswith(("attn.proj.weight", "mlp.down.weight")):
        return InitSpec("normal", residual_std(cfg))
    if name.endswith("attn.qkv.weight"):
        q, kv = cfg.heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return InitSpec("normal", cfg.init_std, (("q", q), ("k", kv), ("v", kv)))
    if name.endswith("mlp.up.weight") and cfg.family == "llama":
        return InitSpec("normal", cfg.init_std, (("gate", cfg.ffn), ("up", cfg.ffn)))
    return InitSpec("normal", cfg.init_std)


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def full_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full (unsharded) fp32 initial value of parameter `name`, on the CPU."""
    spec = init_spec(cfg, name)
    if spec.kind == "zeros":
        return torch.zeros(shape)
    if spec.kind == "ones":
        return torch.ones(shape)
    if not spec.blocks:
        return torch.randn(shape, generator=_generator(seed, name)) * spec.std
    parts = [torch.randn((rows, *shape[1:]), generator=_generator(seed, f"{name}:{block}")) * spec.std
             for block, rows in spec.blocks]
    return torch.cat(parts, dim=0)


def init_model(model: nn.Module, seed: int, cfg: ModelConfig | None = None) -> None:
    """Fill every parameter of `model` (a full model, a slice of one, or a tensor-parallel shard) from
    `seed`. A parameter with a `shard_spec` gets its part of the full tensor, so every layout holds
    exactly the values of the single-device model."""
    cfg = cfg or model.cfg
    with torch.no_grad():
        for name, p in model.named_parameters():
            spec: ShardSpec | None = getattr(p, "shard_spec", None)
            value = full_tensor(cfg, name, spec.full_shape if spec else tuple(p.shape), seed)
            if spec is not None:
                value = spec.take(value)
            p.copy_(value.to(p.dtype))
