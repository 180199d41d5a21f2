"""What a pretrained model's own files say about its shape: the model.* config keys of a Hugging Face
model directory (config.json) or of a .gguf file (its metadata), and nothing else.

`megaloom.config.load_config` calls `pretrained_model_keys` when model.pretrained is set, before it
validates, so this module imports nothing of megaloom but the error type (the config layer sits below
everything else). Anything megaloom's two families cannot represent exactly (another architecture,
rope scaling, biases where megaloom has none, a sliding window shorter than the context) stops here
with one line, before a weight is read.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from megaloom.errors import ConfigError

# Hugging Face architecture -> megaloom family. Mistral and Qwen2 are Llama-style decoders: Qwen2 adds
# q/k/v biases, Mistral a sliding window (exact below the window, which caps the context).
ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
SUPPORTED = ", ".join(ARCHITECTURES) + " (Hugging Face directories) and llama (.gguf files)"


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def pretrained_model_keys(path: str | Path) -> dict[str, Any]:
    """The model.* keys of a pretrained model: family, layers, hidden, heads, kv_heads, ffn_hidden,
    vocab_size, norm_eps, rope_theta, head, qkv_bias, max_positions."""
    path = Path(path)
    if is_gguf(path):
        if not path.is_file():
            raise ConfigError(f"model.pretrained = '{path}' does not exist; pass a .gguf file or a Hugging Face "
                              "model directory")
        return gguf_model_keys(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.pretrained = '{path}' is not a Hugging Face model directory (no config.json) "
                          "nor a .gguf file; pass one of those")
    return hf_model_keys(json.loads((path / "config.json").read_text(encoding="utf-8")), str(path))


def architecture(hf: dict[str, Any], where: str) -> str:
    """The supported Hugging Face architecture of a config.json, or one line saying what is supported."""
    archs = hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type", ""), hf.get("model_type", "?"))]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.pretrained = '{where}' is a {arch} model; megaloom reads {SUPPORTED}")
    return arch


def hf_model_keys(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """config.json -> model.* keys (see `pretrained_model_keys`)."""
    arch = architecture(hf, where)
    if ARCHITECTURES[arch] == "gpt2":
        return _gpt2_keys(hf, where)
    return _llama_keys(hf, arch, where)


def _unsupported(where: str, arch: str, what: str) -> ConfigError:
    return ConfigError(f"model.pretrained = '{where}' ({arch}) has {what}, which megaloom's model does not "
                       f"implement; megaloom reads {SUPPORTED} without it")


def _gpt2_keys(hf: dict[str, Any], where: str) -> dict[str, Any]:
    arch = "GPT2LMHeadModel"
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # megaloom's GeLU is the tanh approximation
        raise _unsupported(where, arch, f"activation_function = {act!r}")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise _unsupported(where, arch, "a non-standard attention scale")
    hidden = hf["n_embd"]
    return {
        "family": "gpt2", "layers": hf["n_layer"], "hidden": hidden, "heads": hf["n_head"], "kv_heads": 0,
        "ffn_hidden": hf.get("n_inner") or 4 * hidden, "vocab_size": hf["vocab_size"],
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)), "rope_theta": 10000.0,
        "head": "tied" if hf.get("tie_word_embeddings", True) else "untied", "qkv_bias": False,
        "max_positions": hf.get("n_positions", 1024),
    }


def _llama_keys(hf: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(where, arch, f"hidden_act = {hf['hidden_act']!r}")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise _unsupported(where, arch, f"head_dim = {hf['head_dim']} (not hidden_size / num_attention_heads)")
    if hf.get("mlp_bias"):
        raise _unsupported(where, arch, "MLP biases (mlp_bias = true)")
    qwen2 = arch == "Qwen2ForCausalLM"
    if hf.get("attention_bias") and not qwen2:
        raise _unsupported(where, arch, "attention biases (attention_bias = true)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for kind in (rope.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):  # transformers 5 and 4
        if kind not in (None, "default"):
            raise _unsupported(where, arch, f"rope scaling of type {kind!r}")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    positions = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if (not qwen2 or hf.get("use_sliding_window")) else None
    if window:  # attention inside a window of W tokens is full attention for sequences up to W
        positions = min(positions, window)
    tied = hf.get("tie_word_embeddings", False)
    return {
        "family": "llama", "layers": hf["num_hidden_layers"], "hidden": hidden, "heads": heads,
        "kv_heads": hf.get("num_key_value_heads") or heads, "ffn_hidden": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"], "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "rope_theta": theta,
        "head": "tied" if tied else "untied", "qkv_bias": qwen2, "max_positions": positions,
    }


def gguf_reader(path: str | Path):  # noqa: ANN201 (gguf.GGUFReader, imported lazily)
    """gguf's reader of a file (memory-mapped; nothing is dequantised). Parsing the metadata takes
    seconds (the vocabulary is read entry by entry), so one reader per file version is kept."""
    p = Path(path).resolve()
    stat = p.stat()
    return _reader(str(p), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int):  # noqa: ANN202 - the key includes the file's version
    from gguf import GGUFReader

    return GGUFReader(path)


def gguf_metadata(path: Path) -> tuple[dict[str, Any], list[str]]:
    """A .gguf file's metadata (scalars and strings; the vocabulary arrays left out) and its tensor names."""
    reader = gguf_reader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model":
            continue  # vocabulary arrays: read by the tokenizer, not needed for the shape
        meta[key] = field.contents()
    return meta, [t.name for t in reader.tensors]


def gguf_model_keys(path: Path) -> dict[str, Any]:
    """GGUF metadata -> model.* keys. Only the llama architecture (Llama, SmolLM, Mistral-style files)."""
    meta, tensors = gguf_metadata(path)
    arch = meta.get("general.architecture", "?")
    if arch != "llama":
        raise ConfigError(f"model.pretrained = '{path}' is a GGUF file of architecture {arch!r}; megaloom reads "
                          f"{SUPPORTED}")
    a = "llama."
    hidden, heads = meta[a + "embedding_length"], meta[a + "attention.head_count"]
    if meta.get(a + "rope.dimension_count", hidden // heads) != hidden // heads:
        raise _unsupported(str(path), "gguf llama", "a rotary dimension other than the head size")
    if meta.get(a + "rope.scaling.type", "none") not in ("none", ""):
        raise _unsupported(str(path), "gguf llama", f"rope scaling of type {meta[a + 'rope.scaling.type']!r}")
    if any(name.endswith((".attn_q.bias", ".attn_output.bias", ".ffn_up.bias")) for name in tensors):
        raise _unsupported(str(path), "gguf llama", "projection biases")
    vocab = meta.get(a + "vocab_size")
    if vocab is None:
        vocab = len(gguf_reader(path).fields["tokenizer.ggml.tokens"].data)
    return {
        "family": "llama", "layers": meta[a + "block_count"], "hidden": hidden, "heads": heads,
        "kv_heads": meta.get(a + "attention.head_count_kv") or heads, "ffn_hidden": meta[a + "feed_forward_length"],
        "vocab_size": vocab, "norm_eps": float(meta[a + "attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get(a + "rope.freq_base", 10000.0)),
        "head": "untied" if "output.weight" in tensors else "tied", "qkv_bias": False,
        "max_positions": meta.get(a + "context_length", 2048),
    }
