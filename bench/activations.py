"""Bytes of activations a forward pass leaves alive for backward, measured on any device.

A TorchDispatchMode sees every tensor an operator creates during the forward; after the forward,
the storages still alive are exactly what autograd (saved tensors, checkpoint inputs) keeps for
backward, plus the output. Storages of parameters and buffers, and tensors computed from them alone
(the 16-bit copies of the weights that autocast makes), are not activations and are left out. Views
share their base's storage and are counted once. On a GPU this equals the allocator's growth over
the forward (minus the weight copies), without the allocator's rounding; it also works on the CPU,
which has no allocator statistics.

Per-layer figures come from two depths: (bytes at l2 layers - bytes at l1 layers) / (l2 - l1), which
cancels the embedding, the head and the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Created(TorchDispatchMode):
    def __init__(self, constants: list[torch.Tensor]):
        super().__init__()
        self.constant = {_key(t) for t in constants}  # parameters, buffers and what is computed from them alone
        self.created: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_constants = bool(inputs) and all(_key(t) in self.constant for t in inputs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            k = _key(t)
            if from_constants:
                self.constant.add(k)
            elif k not in self.constant and (k not in self.created or self.created[k][0].expired()):
                self.created[k] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
        return out

    def alive_bytes(self) -> int:
        return sum(n for ref, n in self.created.values() if not ref.expired())


def retained_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor],
                   autocast: torch.dtype | None = None) -> int:
    """Bytes of the tensors created by `forward()` (a closure over `model`) that are still alive
    after it returns, i.e. what is kept for backward. Backward is run afterwards to free them."""
    device = next(model.parameters()).device
    constants = [*model.parameters(), *model.buffers()]
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    mode = _Created(constants)
    with mode, ctx:
        out = forward()
    alive = mode.alive_bytes()
    out.backward()
    return alive


def per_layer_bytes(build: Callable[[int], torch.nn.Module], forward: Callable[[torch.nn.Module], torch.Tensor],
                    autocast: torch.dtype | None = None, depths: tuple[int, int] = (2, 4)) -> float:
    """Activation bytes per layer: the difference between two depths built by `build(layers)`."""
    l1, l2 = depths
    m1, m2 = build(l1), build(l2)
    b1 = retained_bytes(m1, lambda: forward(m1), autocast)
    b2 = retained_bytes(m2, lambda: forward(m2), autocast)
    return (b2 - b1) / (l2 - l1)
