"""Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021), with PEFT's semantics
(peft/tuners/prefix_tuning, peft/tuners/prompt_tuning, PeftModelForCausalLM.forward).

Prefix tuning (peft.method = "prefix"): every layer gets `virtual_tokens` learned keys and values that each
real token attends to before its own sequence (PEFT's prefix_projection = False: the keys and values are
the parameters). PEFT holds them as one embedding (virtual_tokens, layers·2·kv_hidden), layer i's keys then
values in columns [2i·kv, (2i+2)·kv); megaloom holds layer i's columns as `layers.{i}.attn.prefix` (so a
pipeline stage holds its layers' and a tensor-parallel rank its key/value heads' columns), random N(0, 1)
as PEFT's embedding. As in transformers with PEFT's past_key_values, the prefix keys carry no rotary
position and the real tokens' positions start at virtual_tokens; generation's KV cache starts with them.

Prompt tuning (peft.method = "prompt"): `virtual_tokens` soft-prompt embeddings (`prompt`, on the first
stage) are put before the token embeddings, so the sequence inside the model is seq_len + virtual_tokens
long (GPT-2 adds its learned positions 0.. to them as to any input embedding; real tokens start at
virtual_tokens); the loss is on the real tokens only (PEFT's -100 labels for the prompt). Random N(0, 1)
(PEFT's RANDOM init) or, with peft.prompt_init_text, the embeddings of that text's tokens, repeated or cut
to virtual_tokens (PEFT's TEXT init, the tokenizer's special tokens included as transformers adds them).

Packed documents (data.packing): the virtual tokens come before every document, as before the document
alone (`Packing.from_docs`): a packed document's loss equals its loss alone.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from megaloom.config import Config
from megaloom.errors import ConfigError
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.shard import ShardSpec
from megaloom.tune.peft import place, seeded

PEFT_KEY = "prompt_embeddings"  # get_peft_model_state_dict's key for both methods
_PREFIX = re.compile(r"layers\.(\d+)\.attn\.prefix")


def apply(chunk: nn.Module, cfg: Config, tp: TPGroup | None) -> None:
    """Prefix tuning: every layer's keys and values; prompt tuning: the soft prompt on the first stage.
    Every stage learns how many virtual tokens come before the real ones (`set_virtual_tokens`)."""
    t, rank = (tp.size, tp.rank) if tp is not None and tp.size > 1 else (1, 0)
    m, vt = cfg.model, cfg.peft.virtual_tokens
    device = next(chunk.parameters()).device
    if cfg.peft.method == "prefix":
        kv = m.n_kv_heads * m.head_dim
        for i, block in chunk.layers.items():
            p = nn.Parameter(torch.empty(vt, 2 * kv // t, device=device))
            if t > 1:  # this rank's key heads, then its value heads
                p.shard_spec = ShardSpec((vt, 2 * kv), 1, (kv, kv), rank, t)
            block.attn.prefix = p
            place(p, seeded(cfg.train.seed, f"layers.{i}.attn.prefix", (vt, 2 * kv)))
        chunk.set_virtual_tokens(prefix=vt)
        return
    chunk.set_virtual_tokens(prompt=vt)
    if chunk.first:
        chunk.prompt = nn.Parameter(torch.empty(vt, m.hidden, device=device))
        with torch.no_grad():
            chunk.prompt.copy_(_text_init(chunk, cfg, tp) if cfg.peft.prompt_init_text
                               else seeded(cfg.train.seed, "prompt", (vt, m.hidden)))


def _text_init(chunk: nn.Module, cfg: Config, tp: TPGroup | None) -> torch.Tensor:
    """PEFT's TEXT init: the text's token ids (with the special tokens the tokenizer's post-processor adds,
    as `tokenizer(text)` does), repeated and cut to virtual_tokens, looked up in the (pretrained) token
    embedding; under tp each rank looks up its vocabulary rows and the partial rows are summed."""
    from megaloom.data.tokenizer import pretrained_tokenizer

    tok = pretrained_tokenizer(cfg.model.pretrained)
    backend = tok.backend
    ids = backend.encode(cfg.peft.prompt_init_text, add_special_tokens=True).ids if hasattr(backend, "token_to_id") \
        else tok.encode(cfg.peft.prompt_init_text)
    if not ids:
        raise ConfigError(f"peft.prompt_init_text = {cfg.peft.prompt_init_text!r} has no tokens; give some text")
    vt = cfg.peft.virtual_tokens
    ids = (ids * -(-vt // len(ids)))[:vt]
    weight = chunk.embed.tok.weight
    with torch.no_grad():
        rows = chunk.embed.tok(torch.tensor(ids, device=weight.device)).float()
        if tp is not None and tp.size > 1:  # vocab-parallel: each rank's rows, zeros elsewhere
            dist.all_reduce(rows, group=tp.group)
    return rows


def peft_names(chunk: nn.Module) -> dict[str, tuple[str, ShardSpec | None]]:
    """Every virtual-token parameter -> PEFT's one key, `prompt_embeddings`. For prefix tuning each layer
    is a slice of it (columns [2i·kv, (2i+2)·kv), `peft_columns`): `from_peft` cuts it out, `to_peft_tensors`
    puts the layers together."""
    out = {}
    if chunk.prompt is not None:
        out["prompt"] = (PEFT_KEY, None)
    for i, block in chunk.layers.items():
        if block.attn.prefix is not None:
            out[f"layers.{i}.attn.prefix"] = (PEFT_KEY, getattr(block.attn.prefix, "shard_spec", None))
    return out


def peft_columns(name: str, cfg: Config) -> tuple[int, int] | None:
    """The columns [start, stop) of PEFT's prompt_embeddings that megaloom parameter `name` holds (prefix
    tuning: layer i's keys and values); None when it is the whole tensor (prompt tuning)."""
    found = _PREFIX.fullmatch(name)
    if found is None:
        return None
    kv = cfg.model.n_kv_heads * cfg.model.head_dim
    i = int(found.group(1))
    return 2 * i * kv, 2 * (i + 1) * kv


def from_peft(name: str, tensor: torch.Tensor, cfg: Config) -> torch.Tensor:
    """megaloom parameter `name` (full) out of PEFT's prompt_embeddings."""
    cols = peft_columns(name, cfg)
    return tensor if cols is None else tensor[:, cols[0]:cols[1]]


def to_peft_tensors(full: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """PEFT's prompt_embeddings from every virtual-token parameter (full tensors, all layers)."""
    if "prompt" in full:
        return {PEFT_KEY: full["prompt"]}
    layers = sorted(full, key=lambda n: peft_columns(n, cfg)[0])
    if len(layers) != cfg.model.layers:
        raise ValueError(f"prefix tuning: {len(layers)} of {cfg.model.layers} layers' prefixes given")
    return {PEFT_KEY: torch.cat([full[n] for n in layers], dim=1)}


def peft_config(cfg: Config) -> dict:
    """adapter_config.json's keys of the two methods, as PEFT writes them for this model."""
    m, p = cfg.model, cfg.peft
    common = {"num_virtual_tokens": p.virtual_tokens, "num_transformer_submodules": 1, "num_layers": m.layers,
              "modules_to_save": None}
    if p.method == "prefix":  # token_dim and heads of the keys/values (PEFT rewrites them so for GQA)
        kv = m.n_kv_heads * m.head_dim
        return {**common, "token_dim": kv, "num_attention_heads": m.n_kv_heads, "encoder_hidden_size": kv,
                "prefix_projection": False, "init_weights": None}
    return {**common, "token_dim": m.hidden, "num_attention_heads": m.heads,
            "prompt_tuning_init": "TEXT" if p.prompt_init_text else "RANDOM",
            "prompt_tuning_init_text": p.prompt_init_text or None,
            "tokenizer_name_or_path": m.pretrained or None, "tokenizer_kwargs": None}


def merge(chunk: nn.Module) -> None:
    raise ConfigError("prefix and prompt tuning have no weights to merge into the base (their virtual tokens are "
                      "inputs, not weight updates); export them with --to peft")
