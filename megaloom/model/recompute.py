"""Activation recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", §4-5): trade one extra forward for the activations a layer keeps for backward.

- `none`: every layer keeps what autograd saves, s·b·h·(34 + 5·a·s/h) bytes in the paper's count.
- `selective`: the attention core (rotary, softmax(q·kᵀ)·v) is recomputed in backward, which drops the
  5·a·s/h term. With a flash/cuDNN SDPA kernel that term is never stored in the first place (the kernel
  recomputes the probabilities in its own backward), so this mode then saves only the rotated q, k of
  Llama-style models; see docs/performance.md.
- `full`: each layer keeps only its input and reruns its whole forward in backward.

Both use torch.utils.checkpoint, non-reentrant, so they compose with autograd.grad(inputs=...) (the
zero-bubble schedule's split backward), tensor/sequence parallelism (the recomputed forward reissues
its collectives in the same order on every tp rank) and FSDP2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from megaloom.model.dropout import LayoutDropout

MODES = ("none", "selective", "full")


def checkpoint(fn: Callable[..., Any], *args: Any, dropouts: Sequence[LayoutDropout] = ()) -> Any:
    """fn(*args), keeping only `args` for backward and recomputing the rest.

    A LayoutDropout draws its mask from its call counter, so the recomputation must replay the
    counters the first forward saw, and must not advance them: other micro-batches may have run
    forwards in between (pipeline schedules). The global RNG state is not stashed
    (preserve_rng_state=False): nothing inside a layer draws from it.
    """
    fn = _with_function_modes(fn)
    active = [d for d in dropouts if d.p > 0 and d.training]
    if not active:  # nothing to replay: a plain checkpoint (and no Python side effects for torch.compile)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    starts = [d.calls for d in active]

    def replay(*a: Any) -> Any:
        now = [d.calls for d in active]
        for d, start in zip(active, starts):
            d.calls = start
        out = fn(*a)
        # the first run leaves each counter advanced past its masks; a recomputation puts it back
        for d, n in zip(active, now):
            d.calls = max(d.calls, n)
        return out

    return torch.utils.checkpoint.checkpoint(replay, *args, use_reentrant=False, preserve_rng_state=False)


def _with_function_modes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The recomputation runs inside backward, where the torch-function modes of the first forward (zero
    bubble's weight-gradient store, parallel/wgrad.py) are not on the stack: put them back, so the
    recomputed ops are the ones the first forward ran and save the same tensors."""
    modes = torch.overrides._get_current_function_mode_stack()
    if not modes:
        return fn

    def run(*a: Any) -> Any:
        current = torch.overrides._get_current_function_mode_stack()
        with contextlib.ExitStack() as stack:
            for m in modes:
                if not any(m is c for c in current):
                    stack.enter_context(m)
            return fn(*a)

    return run


def set_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Set the recomputation mode of every transformer layer in `model` (a model, a pipeline chunk, or
    a list of chunks), in place. Recomputation only applies to training forwards with gradients."""
    from megaloom.model.layers import Block

    if mode not in MODES:
        raise ValueError(f"recompute = {mode!r} is not one of {' | '.join(MODES)}")
    for module in model.modules():
        if isinstance(module, Block):
            module.recompute = mode == "full"
            module.attn.recompute_core = mode == "selective"
    return model
