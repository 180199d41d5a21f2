"""Parameter and FLOP counts of a transformer.

Source: Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (SC'21), §5.1 (reference/004): with l layers, hidden h, sequence s, vocabulary V and
batch B, the paper counts

    parameters P = 12·l·h²·(1 + 13/(12h) + (V+s)/(12·l·h))
    FLOPs per iteration (no recomputation)  F = 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))
    FLOPs per iteration (full recomputation) F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))

for the GPT architecture with an MLP of 4h and full multi-head attention. For Llama-style models
(SwiGLU MLP of width f, grouped-query attention with kv heads, untied head) the same counting rule —
2 FLOPs per multiply-accumulate, backward = 2x forward, recomputation = one extra forward — gives
the generalised `model_flops_per_token` below, which reduces to the paper's formula for GPT-2.
"""

from __future__ import annotations

from megaloom.config import ModelConfig


def paper_parameters(l: int, h: int, V: int, s: int) -> float:
    """Megatron-LM paper §5.1: 12·l·h²·(1 + 13/(12h) + (V+s)/(12·l·h)). GPT-2 style, excludes the final norm."""
    return 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))


def paper_flops_per_iteration(B: int, s: int, l: int, h: int, V: int, recompute: bool = False) -> float:
    """Megatron-LM paper §5.1, forward + backward (+ recomputation) FLOPs of one batch of B sequences."""
    if recompute:
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


def parameters(cfg: ModelConfig) -> int:
    """Exact analytic parameter count of megaloom's model of either family."""
    h, l, f, V = cfg.hidden, cfg.layers, cfg.ffn, cfg.vocab_size
    kv = cfg.n_kv_heads * cfg.head_dim
    if cfg.family == "gpt2":
        attn = h * (h + 2 * kv) + (h + 2 * kv) + h * h + h      # qkv + bias, proj + bias
        mlp = 2 * h * f + f + h                                   # up + bias, down + bias
        norms = 2 * 2 * h                                         # two LayerNorms (weight + bias)
        return l * (attn + mlp + norms) + V * h + cfg.seq_len * h + 2 * h
    attn = h * (h + 2 * kv) + h * h
    mlp = 3 * h * f
    norms = 2 * h
    return l * (attn + mlp + norms) + 2 * V * h + h


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Matrix-multiply FLOPs of one forward pass per token (2 per multiply-accumulate).

    Per layer: QKV and output projections, attention scores and values (causal masking not
    discounted, as in the paper), the MLP; plus the logit GEMM.
    """
    s = seq_len or cfg.seq_len
    h, f, V = cfg.hidden, cfg.ffn, cfg.vocab_size
    kv = cfg.n_kv_heads * cfg.head_dim
    mlp_mats = 3 if cfg.family == "llama" else 2
    per_layer = 2 * (h * (h + 2 * kv) + h * h + mlp_mats * h * f) + 2 * 2 * s * h
    return cfg.layers * per_layer + 2 * h * V


def model_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token without recomputation (forward + backward = 3 forwards): the
    numerator of MFU. For GPT-2 with f = 4h this equals 72·l·h²·(1 + s/(6h) + V/(12·l·h))."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def hardware_flops_per_token(cfg: ModelConfig, recompute: str = "none", seq_len: int | None = None) -> float:
    """FLOPs the hardware executes per token: full recomputation adds one forward (4 forwards)."""
    fwd = forward_flops_per_token(cfg, seq_len)
    if recompute == "full":
        return 4 * fwd - 2 * cfg.hidden * cfg.vocab_size  # the logit GEMM is not recomputed (paper's V/16 term)
    return 3 * fwd
