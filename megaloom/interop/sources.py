"""Where pretrained weights are read from, under their Hugging Face names.

`SafetensorsSource`: a Hugging Face directory, one `model.safetensors` or the shards that
`model.safetensors.index.json` lists. Reads go through safetensors' `get_slice`, so a rank reads the
bytes of the rows and columns it holds and nothing else.

`GGUFSource`: a .gguf file (llama architecture). GGUF stores quantised blocks along rows, so the
tensors are dequantised whole with the `gguf` package, on every rank that needs them; the names are
translated to Hugging Face's and llama.cpp's q/k row permutation is undone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megaloom.errors import ConfigError
from megaloom.interop.hparams import gguf_reader, is_gguf

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# llama.cpp tensor names -> Hugging Face names ({i} = layer)
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


class SafetensorsSource:
    """The safetensors weights of a Hugging Face model directory, read slice by slice."""

    def __init__(self, directory: Path, rename=lambda name: name):
        from safetensors import safe_open

        self.where = str(directory)
        if (directory / INDEX).is_file():
            weight_map = json.loads((directory / INDEX).read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise ConfigError(f"model.pretrained = '{directory}' holds no {SINGLE} nor {INDEX}; megaloom reads "
                              "safetensors weights (transformers' save_pretrained writes them)")
        self._files = {f: safe_open(str(directory / f), framework="pt") for f in files}
        self._where: dict[str, tuple[str, str]] = {}  # Hugging Face name -> (file, name in the file)
        for f, handle in self._files.items():
            for key in handle.keys():
                self._where[rename(key)] = (f, key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._slice(name).get_shape()) for name in self._where}

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """The part `index` of tensor `name`: only those bytes are read from the file."""
        return self._slice(name)[index]

    def release(self) -> None:
        """Nothing is held in memory but the mapped files."""

    def _slice(self, name: str):  # noqa: ANN202 (safetensors' PySafeSlice)
        f, key = self._where[name]
        return self._files[f].get_slice(key)


class GGUFSource:
    """The tensors of a .gguf file, dequantised to float32 (whole, on first use), under Hugging Face names."""

    def __init__(self, path: Path, heads: int, kv_heads: int):
        self.where = str(path)
        self.heads, self.kv_heads = heads, kv_heads
        self._tensors = {}  # Hugging Face name -> gguf ReaderTensor
        for t in gguf_reader(path).tensors:
            name = _hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self._cache: dict[str, torch.Tensor] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        # gguf lists dimensions fastest-first (ggml's ne); torch's shape is the reverse
        return {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self._tensors.items()}

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._dequantise(name)
        return self._cache[name][index]

    def release(self) -> None:
        """Forget the dequantised tensors: `fill` calls it after each megaloom tensor, so at most the
        parts of one are in memory at a time."""
        self._cache.clear()

    def _dequantise(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rotary(w, self.heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rotary(w, self.kv_heads)
        return torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a copy: F32 tensors map the file


def unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of q/k rows. llama.cpp's converter interleaves each head's two rotary
    halves (rows i and i + d/2 become rows 2i and 2i+1, for its pairwise rotation); Hugging Face and
    megaloom rotate halves (i, i + d/2). Same as transformers' `_reverse_permute_weights`."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        template = GGUF_NAMES.get(".".join(["blk", "{i}", *parts[2:]]))
        return template.format(i=parts[1]) if template else gguf_name
    return GGUF_NAMES.get(gguf_name, gguf_name)  # an unknown tensor keeps its name: reported as unexpected


def open_source(path: str | Path, heads: int, kv_heads: int, rename=lambda name: name):
    """The weights of model.pretrained: a `GGUFSource` for a .gguf file, else a `SafetensorsSource`."""
    path = Path(path)
    if is_gguf(path):
        return GGUFSource(path, heads, kv_heads)
    return SafetensorsSource(path, rename)
