"""Memory estimates: weights, gradients, optimizer state, activations.

Sources:
- Activations per layer, 16-bit, Korthikanti et al. 2022 "Reducing Activation Recomputation in Large
  Transformer Models", §4 (eq. 1-5): s·b·h·(34 + 5·a·s/h) bytes without parallelism; with tensor
  parallelism s·b·h·(10 + 24/t + 5·a·s/(h·t)); with sequence parallelism s·b·h/t·(34 + 5·a·s/h);
  with full recomputation only the layer input, 2·s·b·h (divided by t with sequence parallelism).
  Selective recomputation drops the 5·a·s/h attention-core term.
- Model state, mixed-precision Adam (Rajbhandari et al. 2020, ZeRO §3): 2 (16-bit weights) + 2
  (16-bit gradients) + 12 (fp32 master weights, Adam m and v) = 16 bytes per parameter; ZeRO-1
  4 + 12/d, ZeRO-2 2 + 14/d, ZeRO-3 16/d. Pure fp32 training keeps 4 + 4 + 8 = 16 bytes too.
"""

from __future__ import annotations


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                               recompute: str = "none") -> float:
    """Bytes of activations one transformer layer keeps for backward (16-bit activations)."""
    if recompute == "full":
        return 2 * s * b * h / (t if sequence_parallel else 1)
    attn_core = 0.0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return s * b * h / t * (34 + attn_core)
    return s * b * h * (10 + 24 / t + attn_core / t)


def state_bytes_per_parameter(zero: int = 0, d: int = 1, fp32_weights: bool = False) -> float:
    """Weights + gradients + Adam state per parameter, ZeRO stage over d ranks.

    Mixed precision as the ZeRO paper counts it (§3: 16-bit weights 2, 16-bit gradients 2, fp32
    master weights and Adam moments 12). `fp32_weights`: megaloom's own program, which trains the
    fp32 weights directly under autocast (no 16-bit copy is stored): weights 4, fp32 gradients 4 (the
    data-parallel buffer), Adam moments 8; ZeRO-1 shards the moments only (the gradient buffer stays
    whole: the reduce-scatter runs in place), ZeRO-2 and ZeRO-3 (FSDP2) shard all three."""
    if fp32_weights:
        return {0: 16.0, 1: 8 + 8 / d, 2: 16 / d, 3: 16 / d}[zero]
    return {0: 16.0, 1: 4 + 12 / d, 2: 2 + 14 / d, 3: 16 / d}[zero]
