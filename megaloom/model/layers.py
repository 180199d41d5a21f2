"""Transformer building blocks: norms, attention (MHA / GQA, rotary or learned positions), MLPs.

Written as plain single-device PyTorch. Parallel versions of the linear layers replace these modules
from outside (DESIGN principle 4); parameter names here are the canonical, layout-independent names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megaloom.config import ModelConfig
from megaloom.model.dropout import LayoutDropout
from megaloom.model.recompute import checkpoint


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and names) whose weight and bias follow the input's dtype. Under
    ZeRO-2/3 with bf16 FSDP2 gathers them in bf16 while the residual stream stays fp32, and
    F.layer_norm refuses an fp32 input with bf16 parameters (CPU) or runs it only for bf16 inputs
    (CUDA); the norm then computes in fp32 with the gathered weights, as RMSNorm does already."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight is None or self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "gpt2":
        return LayerNorm(cfg.hidden, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)


def rotary_tables(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (seq_len, head_dim), half-split layout (as Llama / Hugging Face use)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd))
    angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, hd); cos/sin: (T, hd). Rotates pairs (i, i + hd/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


@dataclass
class Packing:
    """Several documents in each sequence (data.packing): every token's position inside its own document,
    and the attention mask that keeps each document to itself. Built once per forward from the document
    ids and shared by every layer; the unpacked path never builds one."""

    positions: torch.Tensor  # (B, T) int64: 0 at the first token of each document
    mask: torch.Tensor  # (B, 1, T, T) bool: True where query t may attend key s (same document, s <= t)

    @staticmethod
    def from_docs(docs: torch.Tensor, prompt: int = 0, offset: int = 0) -> Packing:
        """`docs` (B, T): any ids, equal along each document's contiguous run of tokens and different
        from the neighbouring documents' (what the SFT loader gives: 0, 1, 2, ... along a row).

        Virtual tokens (megaloom/tune/prompt.py) come before every document, as they would before the
        document alone: `prompt` soft-prompt tokens prepended to the row (positions 0..prompt-1, seen by
        every token) or `offset` prefix positions held as keys/values by the attention. Either way each
        document's positions start at prompt + offset."""
        B, T = docs.shape
        idx = torch.arange(T, device=docs.device)
        first = torch.ones(B, T, dtype=torch.bool, device=docs.device)
        first[:, 1:] = docs[:, 1:] != docs[:, :-1]
        positions = idx - torch.where(first, idx, 0).cummax(dim=1).values + prompt + offset
        segment = first.cumsum(dim=1)  # runs, whatever the ids: a repeated id further on is another document
        causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
        mask = (segment.unsqueeze(2) == segment.unsqueeze(1)) & causal
        if prompt:  # the soft prompt: causal among itself, seen by every document, seeing none of them
            P = prompt
            positions = torch.cat([torch.arange(P, device=docs.device).expand(B, P), positions], dim=1)
            top = torch.cat([torch.ones(P, P, dtype=torch.bool, device=docs.device).tril().expand(B, P, P),
                             torch.zeros(B, P, T, dtype=torch.bool, device=docs.device)], dim=2)
            bottom = torch.cat([torch.ones(B, T, P, dtype=torch.bool, device=docs.device), mask], dim=2)
            mask = torch.cat([top, bottom], dim=1)
        return Packing(positions, mask.unsqueeze(1))


class KVCache:
    """Keys and values for incremental decoding, preallocated to `max_len`: of the layers `layer_ids`
    (default all; a pipeline stage holds its own) and `kv_heads` heads (default all; a tensor-parallel
    rank holds n_kv_heads / t)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 layer_ids: Iterable[int] | None = None, kv_heads: int | None = None):
        shape = (batch, kv_heads or cfg.n_kv_heads, max_len, cfg.head_dim)
        layer_ids = range(cfg.layers) if layer_ids is None else layer_ids
        self.k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layer_ids}
        self.v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layer_ids}
        self.max_len = max_len
        self.length = 0  # tokens already stored (the position of the next token)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot append up to position {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Causal self-attention. `qkv` is one fused GEMM whose rows are [q heads; k heads; v heads].

    Dropout is applied to the block's output (layout-independent masks), not to the attention
    probabilities inside SDPA, whose masks would depend on how heads are split over ranks."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.family == "gpt2"
        self.qkv = nn.Linear(cfg.hidden, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=bias or cfg.qkv_bias)
        self.proj = nn.Linear(self.heads * self.head_dim, cfg.hidden, bias=bias)
        self.rotary = cfg.family == "llama"
        self.recompute_core = False  # selective recomputation; set by `set_recompute`
        # prefix tuning (megaloom/tune/prompt.py): (virtual tokens, [k; v] of this rank's kv heads), keys and
        # values every token attends to before its own sequence; None without it
        self.prefix: nn.Parameter | None = None

    def prefix_kv(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix as keys and values (batch, kv_heads, virtual tokens, head_dim). They are used as
        they are, without rotary positions (as a Hugging Face KV cache holds them)."""
        n, P = self.kv_heads * self.head_dim, self.prefix.shape[0]
        k, v = self.prefix.to(dtype).split([n, n], dim=-1)
        return tuple(t.view(P, self.kv_heads, self.head_dim).transpose(0, 1).expand(batch, -1, -1, -1) for t in (k, v))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, packing: Packing | None = None) -> torch.Tensor:
        qkv = self.qkv(x)
        B, T, _ = qkv.shape  # under sequence parallelism x holds part of the sequence, qkv all of it
        q, k, v = qkv.split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        # positions after the prefix's (prefix tuning), or after what the cache already holds
        start = cache.length if cache is not None else 0 if self.prefix is None else self.prefix.shape[0]
        mask = None
        if packing is None:
            cos, sin = (rope[0][start:start + T], rope[1][start:start + T]) if self.rotary else (None, None)
        else:  # positions restart in every document: (B, 1, T, hd) tables, one row per token
            pos, mask = packing.positions, packing.mask
            cos, sin = (rope[0][pos].unsqueeze(1), rope[1][pos].unsqueeze(1)) if self.rotary else (None, None)
        if self.recompute_core and cache is None and torch.is_grad_enabled():
            # selective recomputation (Korthikanti et al. 2022, §5): keep q, k, v, recompute the core
            y = checkpoint(self.core, q, k, v, cos, sin, None, mask, self.prefix)
        else:
            y = self.core(q, k, v, cos, sin, cache, mask, self.prefix)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
             sin: torch.Tensor | None, cache: KVCache | None = None, mask: torch.Tensor | None = None,
             prefix: torch.Tensor | None = None) -> torch.Tensor:
        """The attention core: rotary positions, then softmax(q·kᵀ/√d)·v, (B, heads, T, hd) in and out.
        `mask` (packed documents): SDPA with that boolean mask instead of its causal flag. `prefix`
        (prefix tuning): keys and values put before the sequence's, seen by every token; with a cache
        they are already its first entries (`Transformer.new_cache`)."""
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if prefix is not None and cache is None:
            pk, pv = self.prefix_kv(q.shape[0], k.dtype)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            if mask is not None:
                mask = torch.cat([mask.new_ones(*mask.shape[:3], pk.shape[2]), mask], dim=-1)
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        T = q.shape[2]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=_causal_mask(T, k.shape[2], q.device),
            is_causal=k.shape[2] == T and T > 1,
            enable_gqa=self.kv_heads != self.heads,
        )


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    """None where SDPA's own flags suffice: no cache (is_causal) or one new token (sees everything).
    Otherwise a bottom-right aligned boolean mask (SDPA's is_causal is top-left aligned)."""
    if q_len == k_len or q_len == 1:
        return None
    offset = k_len - q_len
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)


class MLP(nn.Module):
    """GPT-2: up -> GeLU(tanh) -> down. Llama: `up` is the fused [gate; up] GEMM -> SiLU(gate)*up -> down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.family == "llama"
        bias = not self.swiglu
        self.up = nn.Linear(cfg.hidden, cfg.ffn * (2 if self.swiglu else 1), bias=bias)
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). Houlsby adapters
    (megaloom/tune/adapter.py), when set, transform each sublayer's output before the residual sum."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = LayoutDropout(cfg.dropout, f"layers.{layer}.drop", uses=2)  # after attention and after the MLP
        self.recompute = False  # full recomputation: keep only the input; set by `set_recompute`
        self.attn_adapter: nn.Module | None = None
        self.mlp_adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, packing: Packing | None = None) -> torch.Tensor:
        if self.recompute and cache is None and torch.is_grad_enabled():
            # every dropout inside, the block's and any an adapter added (LoRA's), replays its masks
            dropouts = [m for m in self.modules() if isinstance(m, LayoutDropout)]
            return checkpoint(self.body, x, rope, None, packing, dropouts=dropouts)
        return self.body(x, rope, cache, packing)

    def body(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
             cache: KVCache | None = None, packing: Packing | None = None) -> torch.Tensor:
        a = self.drop(self.attn(self.attn_norm(x), rope, cache, packing))
        x = x + (a if self.attn_adapter is None else self.attn_adapter(a))
        m = self.drop(self.mlp(self.mlp_norm(x)))
        return x + (m if self.mlp_adapter is None else self.mlp_adapter(m))


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2's scaled init of the projections that write into the residual stream: std / sqrt(2l)."""
    return cfg.init_std / math.sqrt(2 * cfg.layers)
