"""The plain-PyTorch reference megaloom is measured against: a nanoGPT-style GPT-2 and its loop.

Written the way a careful single-GPU user writes it (karpathy/nanoGPT `model.py` and `train.py`):
pre-LayerNorm blocks, one fused qkv GEMM, `F.scaled_dot_product_attention(is_causal=True)` (flash /
cuDNN on an H100), GeLU-tanh, tied embeddings, fp32 cross entropy on the full logits, bf16 autocast,
fused AdamW on CUDA, gradient clipping at 1.0, and optionally `torch.compile` of the whole model.
Same architecture, parameter count and FLOPs as megaloom's `family = "gpt2"` model, so tokens/s and
MFU compare like for like. Nothing here imports megaloom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    layers: int
    hidden: int
    heads: int
    seq_len: int
    vocab: int


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.c_attn = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.c_proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden, 4 * cfg.hidden)
        self.c_proj = nn.Linear(4 * cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.hidden), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.hidden), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.layers))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(model: nn.Module, lr: float = 6e-4, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """nanoGPT's AdamW: decay on matrices only, the fused CUDA kernel on GPUs."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    cuda = params[0].is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True if cuda else None)


class ReferenceTrainer:
    """One optimizer step of the reference: bf16 autocast forward, backward, clip, fused AdamW."""

    def __init__(self, cfg: GPTConfig, device: torch.device, compile: bool = False, precision: torch.dtype = torch.bfloat16):
        torch.manual_seed(0)
        self.model = GPT(cfg).to(device)
        self.optimizer = make_optimizer(self.model)
        self.forward = torch.compile(self.model) if compile else self.model
        self.device, self.precision = device, precision

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return plain_step(self.model, self.forward, self.optimizer, x, y, self.precision)


def plain_step(model: nn.Module, forward, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """The nanoGPT training step: autocast forward, backward, clip at 1.0, step, zero the gradients.
    bench/gpu.py steps megaloom's bare model with this same function, for the wrapper cost."""
    with torch.autocast(x.device.type, dtype=dtype):
        loss = forward(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
