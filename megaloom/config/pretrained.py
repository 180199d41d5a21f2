"""What a pretrained model (`model.pretrained`) and a PEFT adapter to start from (`peft.init`) decide in a
config: the model's shape and the adapter's method, rank and targets, checked against what the user set."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megaloom.config.schema import Config, ModelConfig, toml_value
from megaloom.errors import ConfigError

# Hugging Face module names each family's adapters can target (peft.targets)
PEFT_TARGETS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                "gpt2": ("c_attn", "c_proj", "c_fc")}
# PEFT's peft_type (adapter_config.json) -> peft.method
PEFT_METHODS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt",
                "BOTTLENECK": "adapter"}


def apply_peft_init(cfg: Config) -> None:
    """peft.init: the adapter's own adapter_config.json sets peft.method and, for LoRA/DoRA, the rank,
    alpha, dropout, rslora and targets (as the config doc says: its keys override the ones here)."""
    import json

    path = Path(cfg.peft.init) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"peft.init = '{cfg.peft.init}' holds no adapter_config.json; pass a directory that PEFT's "
                          "save_pretrained (or megaloom convert --to peft) wrote")
    a = json.loads(path.read_text(encoding="utf-8"))
    kind = a.get("peft_type")
    if kind not in PEFT_METHODS:
        raise ConfigError(f"peft.init = '{cfg.peft.init}' is a {kind} adapter; megaloom reads "
                          f"{', '.join(PEFT_METHODS)}")
    p = cfg.peft
    p.method = "dora" if kind == "LORA" and a.get("use_dora") else PEFT_METHODS[kind]
    if kind == "LORA":
        targets = a.get("target_modules") or []
        if isinstance(targets, str):
            raise ConfigError(f"peft.init = '{cfg.peft.init}' targets modules by the pattern {targets!r}; megaloom "
                              "needs a list of module names (target_modules=[...])")
        if a.get("rank_pattern") or a.get("alpha_pattern") or a.get("layers_to_transform"):
            raise ConfigError(f"peft.init = '{cfg.peft.init}' varies rank, alpha or layers per module (rank_pattern, "
                              "alpha_pattern, layers_to_transform); megaloom adapts every layer alike")
        p.rank, p.alpha = int(a["r"]), float(a["lora_alpha"])
        p.dropout, p.rslora = float(a.get("lora_dropout", 0.0)), bool(a.get("use_rslora", False))
        p.targets = sorted(targets)
    elif kind == "IA3":
        _ia3_init(cfg, a)
    elif kind in ("PREFIX_TUNING", "PROMPT_TUNING"):
        if a.get("prefix_projection"):
            raise ConfigError(f"peft.init = '{cfg.peft.init}' is prefix tuning with prefix_projection = true (an MLP "
                              "over the prefix); megaloom learns the keys and values themselves (PEFT's default)")
        p.virtual_tokens = int(a["num_virtual_tokens"])


def _ia3_init(cfg: Config, a: dict) -> None:
    """An IA3 adapter's targets; its feed-forward modules (scaled at the input) must be PEFT's defaults,
    the only ones megaloom scales so: down_proj (llama), the MLP's c_proj (gpt2)."""
    targets = a.get("target_modules") or []
    if isinstance(targets, str):
        raise ConfigError(f"peft.init = '{cfg.peft.init}' targets modules by the pattern {targets!r}; megaloom "
                          "needs a list of module names (target_modules=[...])")
    ff = set(a.get("feedforward_modules") or [])
    if cfg.model.family == "gpt2":
        want = {"mlp.c_proj"} if {"c_proj", "mlp.c_proj"} & set(targets) else set()
    else:
        want = {"down_proj"} & set(targets)
    if ff != want:
        raise ConfigError(f"peft.init = '{cfg.peft.init}' scales the inputs of {sorted(ff)} (feedforward_modules); "
                          f"megaloom scales the input of {sorted(want) or 'no module'} for these targets only")
    cfg.peft.targets = sorted(targets)


def apply_pretrained(cfg: Config, given: set[str]) -> None:
    """model.pretrained: the model.* keys come from the model's own files (megaloom/interop/hparams.py);
    a key the user also set must agree. model.seq_len defaults to the model's context, data.tokenizer to
    the model's tokenizer."""
    from megaloom.interop.hparams import pretrained_model_keys

    m = cfg.model
    for key, value in pretrained_model_keys(m.pretrained).items():
        mine = getattr(m, key)
        if f"model.{key}" in given and not _agrees(m, key, mine, value):
            raise ConfigError(f"model.{key} = {toml_value(mine)} but model.pretrained = '{m.pretrained}' has "
                              f"{key} = {toml_value(value)}; remove model.{key} or set it to {toml_value(value)}")
        setattr(m, key, value)
    if "model.seq_len" not in given:
        m.seq_len = m.max_positions
    if "data.tokenizer" not in given:
        cfg.data.tokenizer = "pretrained"


def _agrees(m: ModelConfig, key: str, mine: Any, theirs: Any) -> bool:
    """Whether a user's value means the pretrained one: 0 kv_heads = heads, 0 ffn_hidden and "auto" head
    = the family's default, floats equal to float32 precision (GGUF stores them in float32)."""
    if isinstance(theirs, float):
        return abs(mine - theirs) <= 1e-6 * max(abs(theirs), 1e-30)
    if key == "kv_heads":
        return (mine or m.heads) == (theirs or m.heads)
    if key == "ffn_hidden" and mine == 0:
        return dataclasses.replace(m, ffn_hidden=0).ffn == theirs
    if key == "head" and mine == "auto":
        return dataclasses.replace(m, head="auto").tied == (theirs == "tied")
    return mine == theirs


