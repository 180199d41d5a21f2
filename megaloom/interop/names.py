"""What maps to what: each megaloom parameter as Hugging Face tensors, per family.

megaloom fuses q, k, v into one `attn.qkv` GEMM (rows [q; k; v]) and Llama's gate and up projections
into one `mlp.up` (rows [gate; up]); Hugging Face keeps them apart. A megaloom tensor is therefore a
list of `Part`s stacked along its rows. GPT-2's Conv1D stores weights as (in, out), the transpose of a
Linear's (out, in): those parts are `transposed`. Nothing else changes: Hugging Face's Llama stores
q and k in the half-split rotary layout (rotate_half) that megaloom's rotary uses, so no permutation
is needed (a .gguf file's q/k rows are permuted by llama.cpp; `sources.GGUFSource` undoes that).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megaloom.config import ModelConfig
from megaloom.model.transformer import Transformer


@dataclass(frozen=True)
class Part:
    """One Hugging Face tensor inside a megaloom tensor: `rows` consecutive rows of it (of its transpose
    when `transposed`: GPT-2's Conv1D weights)."""

    hf: str
    rows: int
    transposed: bool = False


# megaloom name inside layer i -> Hugging Face name templates ({i} = layer), stacked along the rows
LLAMA_LAYER = {
    "attn_norm.weight": ["model.layers.{i}.input_layernorm.weight"],
    "attn.qkv.weight": ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                        "model.layers.{i}.self_attn.v_proj.weight"],
    "attn.qkv.bias": ["model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
                      "model.layers.{i}.self_attn.v_proj.bias"],
    "attn.proj.weight": ["model.layers.{i}.self_attn.o_proj.weight"],
    "mlp_norm.weight": ["model.layers.{i}.post_attention_layernorm.weight"],
    "mlp.up.weight": ["model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"],
    "mlp.down.weight": ["model.layers.{i}.mlp.down_proj.weight"],
}
LLAMA_TOP = {"embed.tok.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}

GPT2_LAYER = {  # (name, transposed): Conv1D weights are (in, out)
    "attn_norm.weight": ("transformer.h.{i}.ln_1.weight", False),
    "attn_norm.bias": ("transformer.h.{i}.ln_1.bias", False),
    "attn.qkv.weight": ("transformer.h.{i}.attn.c_attn.weight", True),
    "attn.qkv.bias": ("transformer.h.{i}.attn.c_attn.bias", False),
    "attn.proj.weight": ("transformer.h.{i}.attn.c_proj.weight", True),
    "attn.proj.bias": ("transformer.h.{i}.attn.c_proj.bias", False),
    "mlp_norm.weight": ("transformer.h.{i}.ln_2.weight", False),
    "mlp_norm.bias": ("transformer.h.{i}.ln_2.bias", False),
    "mlp.up.weight": ("transformer.h.{i}.mlp.c_fc.weight", True),
    "mlp.up.bias": ("transformer.h.{i}.mlp.c_fc.bias", False),
    "mlp.down.weight": ("transformer.h.{i}.mlp.c_proj.weight", True),
    "mlp.down.bias": ("transformer.h.{i}.mlp.c_proj.bias", False),
}
GPT2_TOP = {"embed.tok.weight": "transformer.wte.weight", "embed.pos.weight": "transformer.wpe.weight",
            "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
            "head.weight": "lm_head.weight"}

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def hf_parts(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> list[Part]:
    """The Hugging Face tensors that make up megaloom parameter `name` (full shape `shape`)."""
    found = _LAYER.fullmatch(name)
    layer, local = (int(found.group(1)), found.group(2)) if found else (None, name)
    if cfg.family == "gpt2":
        if layer is None:
            return [Part(GPT2_TOP[local], shape[0])]
        hf, transposed = GPT2_LAYER[local]
        return [Part(hf.format(i=layer), shape[0], transposed)]
    if layer is None:
        return [Part(LLAMA_TOP[local], shape[0])]
    names = [n.format(i=layer) for n in LLAMA_LAYER[local]]
    q, kv = cfg.heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = {"attn.qkv.weight": [q, kv, kv], "attn.qkv.bias": [q, kv, kv],
            "mlp.up.weight": [cfg.ffn, cfg.ffn]}.get(local, [shape[0]])
    return [Part(n, r) for n, r in zip(names, rows, strict=True)]


def part_shape(part: Part, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of `part` of a megaloom tensor of shape `shape`."""
    if len(shape) == 1:
        return (part.rows,)
    return (shape[1], part.rows) if part.transposed else (part.rows, shape[1])


def megaloom_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the full single-device model with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the model of `cfg` reads or writes, with its shape."""
    out = {}
    for name, shape in megaloom_shapes(cfg).items():
        for part in hf_parts(cfg, name, shape):
            out[part.hf] = part_shape(part, shape)
    return out


def ignorable(cfg: ModelConfig, hf_name: str) -> bool:
    """Tensors a Hugging Face file may hold that the model does not need: GPT-2's causal-mask buffers
    (old files), and a tied model's copy of the head."""
    if cfg.family == "gpt2" and hf_name.endswith((".attn.bias", ".attn.masked_bias")) and "c_attn" not in hf_name:
        return True
    return cfg.tied and hf_name == "lm_head.weight"


def canonical_hf_name(cfg: ModelConfig, hf_name: str) -> str:
    """Old GPT-2 files (openai-community/gpt2) name tensors without the `transformer.` prefix."""
    if cfg.family == "gpt2" and not hf_name.startswith(("transformer.", "lm_head.")):
        return "transformer." + hf_name
    return hf_name


def hf_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face class that holds exactly megaloom's model of `cfg`."""
    if cfg.family == "gpt2":
        return "GPT2LMHeadModel"
    return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
