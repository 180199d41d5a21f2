"""Load a trained model (and its tokenizer) from a checkpoint, and sample text from it."""

from __future__ import annotations

from pathlib import Path

import torch

from megaloom.config import Config, ConfigError, load_config
from megaloom.data import Tokenizer, load_tokenizer
from megaloom.model.generate import generate
from megaloom.model.transformer import Transformer
from megaloom.train.checkpoint import latest_checkpoint, load_weights


def load_pretrained(path: Path, device: str = "auto") -> tuple[Transformer, Tokenizer, Config]:
    """Model, tokenizer and config of a checkpoint directory or of a run directory's newest checkpoint."""
    ckpt = latest_checkpoint(Path(path))
    cfg = load_config(ckpt / "config.toml", ['model.pretrained=""'])  # the weights are the checkpoint's
    run_dir = ckpt.parent.parent
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer(cfg.model)
    load_weights(model, ckpt)
    return model.to(device).eval(), tokenizer, cfg


def generate_text(path: Path, prompt: str, *, num_samples: int = 1, max_new_tokens: int = 128,
                  temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0, seed: int = 0,
                  use_cache: bool = True, device: str = "auto") -> list[str]:
    model, tokenizer, cfg = load_pretrained(path, device)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    if len(ids) >= cfg.model.seq_len:
        raise ConfigError(f"--prompt is {len(ids)} tokens but the model's context (model.seq_len) is "
                          f"{cfg.model.seq_len}; shorten the prompt")
    if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature < 0:
        raise ConfigError(f"--top-p ({top_p}) must be in (0, 1], --top-k ({top_k}) and --temperature "
                          f"({temperature}) must not be negative")
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    prompt_ids = torch.tensor([ids] * num_samples, device=dev)
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   use_cache=use_cache, generator=gen)
    texts = []
    for row in out.tolist():
        if tokenizer.eos_id in row[len(ids):]:  # a document ended: stop the sample there
            row = row[: len(ids) + row[len(ids):].index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(row))
    return texts
