"""Autoregressive sampling: temperature, top-k, top-p (nucleus), with or without a KV cache."""

from __future__ import annotations

import torch

from megaloom.model.transformer import Transformer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 means greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, use_cache: bool = True, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue `prompt` (B, T) by up to `max_new_tokens`, never past model.seq_len in total.

    With the cache each step feeds one token; without it each step re-runs the whole sequence.
    Both paths compute the same logits, which the tests check.
    """
    was_training = model.training
    model.eval()
    seq = prompt
    max_new_tokens = min(max_new_tokens, model.cfg.seq_len - prompt.shape[1])
    if max_new_tokens < 0:
        raise ValueError(f"prompt of {prompt.shape[1]} tokens is longer than model.seq_len ({model.cfg.seq_len})")
    cache = model.new_cache(prompt.shape[0]) if use_cache else None
    step_input = prompt
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else seq, cache=cache)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos_id is not None and bool((nxt == eos_id).all()):
            break
    model.train(was_training)
    return seq
