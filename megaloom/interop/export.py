"""Weights out: a megaloom checkpoint (saved in any layout) as a Hugging Face model directory; and a
pretrained model (Hugging Face directory or .gguf) as a megaloom checkpoint that any layout loads.

The Hugging Face directory holds config.json, generation_config.json, the weights as safetensors
(one file, or shards and model.safetensors.index.json above `max_shard_bytes`) and the tokenizer
(tokenizer.json, tokenizer_config.json, the chat template), so that transformers' AutoModelForCausalLM
and AutoTokenizer load it as they load a published model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megaloom.config import Config, ModelConfig, to_toml
from megaloom.data.sources import DataError
from megaloom.data.tokenizer import EOS_TOKEN, GPT2_PATTERN, Tokenizer
from megaloom.errors import ConfigError
from megaloom.interop.fill import fill, pretrained_source
from megaloom.interop.load import resolve, tokenizer_of
from megaloom.interop.names import hf_architecture, hf_parts, megaloom_shapes
from megaloom.train.checkpoint import full_tensors, write_directory
from megaloom.train.sharded_state import Piece, Sharded

MAX_SHARD_BYTES = 2_000_000_000  # Hugging Face's convention: sizes in decimal gigabytes


# ------------------------------------------------------------------------------------- megaloom -> HF


def hf_state(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megaloom's full tensors under Hugging Face names: fused GEMMs split, Conv1D weights transposed.
    A tied head is not written (transformers ties it to the embedding)."""
    out = {}
    for name, t in tensors.items():
        parts = hf_parts(cfg, name, tuple(t.shape))
        for part, rows in zip(parts, t.split([p.rows for p in parts]), strict=True):
            out[part.hf] = (rows.T if part.transposed else rows).contiguous()
    return out


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer | None, dtype: torch.dtype) -> dict:
    """config.json of the Hugging Face class that is megaloom's model of `cfg`."""
    arch = hf_architecture(cfg)
    ids = {"bos_token_id": tokenizer.bos_id if tokenizer else None,
           "eos_token_id": tokenizer.eos_id if tokenizer else None}
    if tokenizer is not None and tokenizer.kind != "pretrained" and ids["bos_token_id"] is None:
        ids["bos_token_id"] = tokenizer.eos_id  # megaloom's own tokenizers separate documents with eos only
    common = {"architectures": [arch], "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tied,
              "dtype": str(dtype).removeprefix("torch."), "use_cache": True, **ids}
    if cfg.family == "gpt2":
        return {**common, "model_type": "gpt2", "n_embd": cfg.hidden, "n_layer": cfg.layers, "n_head": cfg.heads,
                "n_inner": cfg.ffn, "n_positions": cfg.positions, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": 0.0}
    config = {**common, "model_type": "qwen2" if cfg.qkv_bias else "llama", "hidden_size": cfg.hidden,
              "intermediate_size": cfg.ffn, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
              "max_position_embeddings": cfg.positions, "rms_norm_eps": cfg.norm_eps,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
              "rope_theta": cfg.rope_theta,  # the key readers before transformers 5 look for
              "attention_dropout": 0.0}
    if cfg.qkv_bias:
        config.update(use_sliding_window=False, sliding_window=None)
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def save_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or shards model-0000i-of-0000n.safetensors with model.safetensors.index.json when
    the tensors exceed `max_shard_bytes` (filled in order, a tensor never split). The files written."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def save_tokenizer(tokenizer: Tokenizer, out: Path, positions: int) -> None:
    """tokenizer.json and tokenizer_config.json (and the chat template) as AutoTokenizer reads them. A
    pretrained model's own files are written as they came; megaloom's BPE and GPT-2's tiktoken ranks
    (converted by transformers' TikTokenConverter) get a tokenizer_config.json naming eos."""
    if tokenizer.kind == "gpt2":
        from transformers.convert_slow_tokenizer import TikTokenConverter

        backend = TikTokenConverter(vocab_file=str(tokenizer._ranks_path), pattern=GPT2_PATTERN,
                                    extra_special_tokens=[EOS_TOKEN]).converted()
    else:
        backend = tokenizer.backend
    backend.save(str(out / "tokenizer.json"))
    if tokenizer.kind == "pretrained":
        for name, text in tokenizer.hf_files.items():
            (out / name).write_text(text, encoding="utf-8")
        if "tokenizer_config.json" in tokenizer.hf_files:
            return
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": positions,
              "clean_up_tokenization_spaces": False, "eos_token": backend.id_to_token(tokenizer.eos_id),
              "bos_token": backend.id_to_token(tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id)}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_hf(source: Path, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple[Path, int]:
    """The newest checkpoint of run directory `source` (or checkpoint `source`), saved in any layout, as
    a Hugging Face model directory `out`. Returns the checkpoint and the number of tensors written."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not empty; pass a new directory for the Hugging Face model")
    cfg, ckpt = resolve(source)
    if ckpt is None:
        raise ConfigError(f"'{source}' is already a pretrained model; --to hf converts a megaloom run or checkpoint")
    try:
        tokenizer = tokenizer_of(source, ckpt)
    except FileNotFoundError:
        tokenizer = None
    tensors = hf_state(cfg.model, full_tensors(ckpt))  # the checkpoint's full tensors, whatever its layout
    dtype = next(iter(tensors.values())).dtype
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(tensors, tmp, max_shard_bytes)
    config = hf_config(cfg.model, tokenizer, dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp, cfg.model.positions)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return ckpt, len(tensors)


# ------------------------------------------------------------------------------------- HF -> megaloom


def import_pretrained(source: Path, out: Path) -> tuple[Config, int, Tokenizer | None]:
    """A Hugging Face directory or a .gguf file as a weights-only megaloom checkpoint `out` (with the
    model's tokenizer, if it has one, in out/tokenizer), which checkpoint.load accepts in any layout.
    Returns the config, the number of tensors and the tokenizer."""
    cfg, ckpt = resolve(source)
    if ckpt is not None:
        raise ConfigError(f"'{source}' is a megaloom checkpoint already; pass a Hugging Face directory or a .gguf file")
    try:
        tokenizer = tokenizer_of(source, None)
    except DataError:  # weights without a tokenizer still import
        tokenizer = None
    state = {f"model/{name}": Sharded(shape, [Piece(torch.empty(shape), (0,) * len(shape))])
             for name, shape in megaloom_shapes(cfg.model).items()}
    fill(state, cfg.model, pretrained_source(cfg.model))
    write_directory(Path(out), state, to_toml(cfg), step=0, layout={"weights_only": True})
    if tokenizer is not None:
        tokenizer.save(Path(out) / "tokenizer")
    return cfg, len(state), tokenizer
