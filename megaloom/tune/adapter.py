"""Houlsby adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1 and Fig. 2):
a bottleneck after each sublayer of every block, before the residual sum,

    a(h) = h + W_up · gelu(W_down · h + b_down) + b_up,     x ← x + a(sublayer(norm(x)))

once after attention (`layers.{i}.attn_adapter`) and once after the MLP (`layers.{i}.mlp_adapter`), of
width peft.bottleneck. W_up and b_up start at zero, so the model starts as the base (the paper's
near-identity init); W_down is N(0, 0.01²) (the paper's small init), b_down zero. GeLU (tanh form), the
nonlinearity of the paper's BERT implementation.

PEFT has no Houlsby adapter: these train, checkpoint and merge nowhere else, and `megaloom convert --to
peft` refuses them. Tests check the formula written out by hand and tp = 2 equal to tp = 1.

Tensor parallelism: the adapters are replicated (2·h·bottleneck parameters per sublayer, far below a
layer's 12·h²), computed whole on every rank from the replicated residual stream: no collective is
added; under sequence parallelism each rank adapts its part of the sequence and the gradients are summed
over tp like the norms' (`parallel/tensor.py sync_replicated_grads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaloom.config import Config
from megaloom.errors import ConfigError
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.shard import ShardSpec
from megaloom.tune.peft import place, seeded

DOWN_STD = 1e-2  # Houlsby et al. §3.6: weights drawn near zero


class Houlsby(nn.Module):
    """One bottleneck adapter with its residual connection: h + up(gelu(down(h)))."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        self.switch = None  # the chunk's AdapterSwitch (megaloom/tune/peft.py): off, the adapter is the identity

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.switch is not None and not self.switch.on:
            return h
        return h + self.up(F.gelu(self.down(h), approximate="tanh")).to(h.dtype)


def apply(chunk: nn.Module, cfg: Config, tp: TPGroup | None) -> None:
    """An adapter after attention and after the MLP of every block of `chunk`, identity at start."""
    if cfg.peft.bottleneck < 1:
        raise ConfigError(f"peft.bottleneck = {cfg.peft.bottleneck}: the adapters need a width of at least 1")
    h, r = cfg.model.hidden, cfg.peft.bottleneck
    for i, block in chunk.layers.items():
        for where in ("attn_adapter", "mlp_adapter"):
            adapter = Houlsby(h, r)
            base = f"layers.{i}.{where}"
            place(adapter.down.weight, seeded(cfg.train.seed, f"{base}.down.weight", (r, h), scale=DOWN_STD))
            place(adapter.down.bias, seeded(cfg.train.seed, f"{base}.down.bias", (r,), "zeros"))
            place(adapter.up.weight, seeded(cfg.train.seed, f"{base}.up.weight", (h, r), "zeros"))
            place(adapter.up.bias, seeded(cfg.train.seed, f"{base}.up.bias", (h,), "zeros"))
            adapter.switch = getattr(chunk, "peft_switch", None)
            setattr(block, where, adapter)


def peft_names(chunk: nn.Module) -> dict[str, tuple[str, ShardSpec | None]]:
    """The adapters' parameters, under megaloom's own names (PEFT has no such method): what checkpoints
    hold; replicated over tp."""
    return {f"layers.{i}.{where}.{n}": (f"layers.{i}.{where}.{n}", None)
            for i, block in chunk.layers.items() for where in ("attn_adapter", "mlp_adapter")
            if getattr(block, where) is not None for n, _ in getattr(block, where).named_parameters()}


def peft_config(cfg: Config) -> dict:
    raise ConfigError("peft.method = 'adapter' (Houlsby adapters) has no PEFT format to export to; keep the "
                      "megaloom checkpoint (generate and eval load it), or choose lora, ia3, prefix or prompt")


def merge(chunk: nn.Module) -> None:
    raise ConfigError("Houlsby adapters are nonlinear (a GeLU between two projections): they cannot be merged "
                      "into the base weights; keep the megaloom checkpoint")
