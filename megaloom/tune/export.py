"""A PEFT run out: its adapters as a PEFT adapter directory (`megaloom convert RUN OUT --to peft`), or
merged into the base as a Hugging Face model (`--to hf --merge`).

The checkpoint holds each adapter tensor whole, whatever layout saved it (the pieces of
`train/sharded_state.py`); the method's `peft_names` give each one's PEFT key, so no model parallel
code runs here: one process, the single-device model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megaloom.config import Config
from megaloom.errors import ConfigError
from megaloom.interop.export import hf_config, hf_state, save_safetensors, save_tokenizer
from megaloom.interop.load import load_model, resolve, tokenizer_of
from megaloom.model.transformer import Transformer
from megaloom.train.checkpoint import full_tensors
from megaloom.tune.peft import adapter_config, apply_peft, merge_of, method_module, peft_names, to_peft


def peft_run(source: str | Path) -> tuple[Config, Path]:
    cfg, ckpt = resolve(source)
    if ckpt is None or cfg.peft.method == "none":
        raise ConfigError(f"'{source}' is not a megaloom PEFT run (peft.method is none or it holds no checkpoint); "
                          "--to peft and --merge convert the run directory of a peft.method run")
    return cfg, ckpt


def _fresh(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not empty; pass a new directory")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def adapter_tensors(cfg: Config, ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's adapter tensors under PEFT's keys, in PEFT's layout."""
    model = Transformer(cfg.model)  # uninitialised: only the adapter modules' names and shapes are read
    apply_peft(model, cfg, None)
    saved = full_tensors(ckpt)
    out = {}
    names = peft_names(model, cfg)
    for name in names:
        if name not in saved:
            raise ConfigError(f"checkpoint {ckpt} lacks the adapter {name}; was it saved by this peft.* config?")
    whole = getattr(method_module(cfg), "to_peft_tensors", None)
    if whole is not None:  # several parameters in one PEFT tensor (prefix tuning: every layer's prefix)
        return {key: t.contiguous() for key, t in whole({n: saved[n] for n in names}, cfg).items()}
    for name, (key, _) in names.items():
        out[key] = to_peft(cfg, name, saved[name]).contiguous()
    return out


def export_peft(source: str | Path, out: str | Path) -> tuple[Path, int]:
    """adapter_model.safetensors + adapter_config.json, what `peft.PeftModel.from_pretrained(base, out)` loads."""
    from safetensors.torch import save_file

    out = Path(out)
    cfg, ckpt = peft_run(source)
    tensors = adapter_tensors(cfg, ckpt)
    tmp = _fresh(out)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = adapter_config(cfg, cfg.model.pretrained or "")
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _publish(tmp, out)
    return ckpt, len(tensors)


@torch.no_grad()
def export_merged(source: str | Path, out: str | Path, max_shard_bytes: int) -> tuple[Path, int]:
    """The base with the adapters folded in (the method's `merge`), as a Hugging Face model directory."""
    out = Path(out)
    cfg, ckpt = peft_run(source)
    merge = merge_of(cfg)  # before the model is loaded
    model, tokenizer, _ = load_model(source)
    merge(model)
    tensors = hf_state(cfg.model, {n: p.detach() for n, p in model.named_parameters()})
    tmp = _fresh(out)
    save_safetensors(tensors, tmp, max_shard_bytes)
    config = hf_config(cfg.model, tokenizer, next(iter(tensors.values())).dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tokenizer(tokenizer_of(source, ckpt), tmp, cfg.model.positions)
    _publish(tmp, out)
    return ckpt, len(tensors)
