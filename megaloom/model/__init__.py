"""Decoder-only transformers (GPT-2 style and Llama style) with layout-independent initialisation."""

from __future__ import annotations

import torch

from megaloom.config import ModelConfig
from megaloom.model.generate import generate, sample_next
from megaloom.model.init import init_model
from megaloom.model.layers import KVCache
from megaloom.model.transformer import Transformer

__all__ = ["KVCache", "Transformer", "build_model", "count_parameters", "generate", "init_model", "sample_next"]


def build_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu") -> Transformer:
    """The full model, initialised from `seed` (identical for every layout), on `device`."""
    model = Transformer(cfg)
    init_model(model, seed)
    return model.to(device)


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count from the module definitions, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())
