"""Decoder-only transformers (GPT-2 style and Llama style) with layout-independent initialisation."""

from __future__ import annotations

import torch

from megaloom.config import ModelConfig
from megaloom.model.generate import generate, sample_next
from megaloom.model.init import init_model
from megaloom.model.layers import KVCache
from megaloom.model.transformer import Transformer
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.tensor import parallelize_tensor

__all__ = ["KVCache", "Transformer", "build_model", "count_parameters", "generate", "init_model", "sample_next"]


def build_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu", tp: TPGroup | None = None) -> Transformer:
    """The model initialised from `seed`, on `device`; with `tp`, this rank's tensor-parallel shard of
    it. Every layout holds exactly the values of the single-device model."""
    model = Transformer(cfg)
    if tp is not None:
        parallelize_tensor(model, tp)
    init_model(model, seed)
    return model.to(device)


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count from the module definitions, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())
