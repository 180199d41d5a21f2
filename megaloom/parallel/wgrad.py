"""The weight-gradient pass of zero-bubble pipelining (Qi et al. 2023, "Zero Bubble Pipeline
Parallelism", §2): the backward of a linear layer is two GEMMs, dL/dx = dL/dy·W (needed at once by the
previous stage: the I pass) and dL/dW = dL/dyᵀ·x (needed by nobody until the optimizer: the W pass).

`WeightGradStore` is a `TorchFunctionMode`: inside it every `F.linear` of a model chunk's forward
(plain `nn.Linear`, the column- and row-parallel linears) runs as `_deferred_linear`, which keeps its
input and weight, exactly what autograd keeps anyway, saved before its GEMM runs (`_SaveInputs`). In
the I pass its backward returns only dL/dx (and the bias gradient, a cheap sum) and stashes (x, dL/dy,
W) for this micro-batch; the W pass (`flush`) then runs just the weight-gradient GEMMs from the stash
and accumulates them into `.grad`. Nothing walks the
graph a second time, and the W pass issues no collective: the tensor-parallel collectives all sit on
the dL/dx path. Numerics equal autograd's: the GEMMs run in the autocast dtype and the weight gradient
is rounded to the parameter's dtype, as autograd's cast backward does.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _Slot:
    """What the weight-gradient half of one deferred linear needs in backward (no tensors: nothing is
    kept alive from the forward by it)."""

    __slots__ = ("store", "key", "weight", "has_bias")

    def __init__(self, store: WeightGradStore, key: Any, weight: torch.nn.Parameter, has_bias: bool) -> None:
        self.store, self.key, self.weight, self.has_bias = store, key, weight, has_bias


class _SaveInputs(torch.autograd.Function):
    """The backward of a deferred linear, with its saved tensors packed *before* the GEMM runs.

    Its forward only saves the (cast) input and weight and returns `carrier`, a one-element tensor
    expanded to the output's shape. `_Gemm` takes it as an input (its forward computes from xc and wc
    only), so that in backward dL/dy flows through it straight back here. Packing first matters under
    recomputation: torch.utils.checkpoint stops a recomputed forward as soon as every tensor the
    backward needs is back, which (as for a native linear, whose inputs are saved before it computes)
    skips a layer's last GEMM, whose output nothing in backward needs."""

    @staticmethod
    def forward(ctx, xc, wc, weight, bias, slot):  # noqa: ANN001, ANN205
        ctx.save_for_backward(xc, wc)
        ctx.slot = slot
        return xc.new_zeros(()).expand(*xc.shape[:-1], wc.shape[0])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        xc, wc = ctx.saved_tensors
        slot = ctx.slot
        grad_x = grad @ wc
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if slot.has_bias else None
        if slot.store.deferring:
            slot.store.stash(slot.key, slot.weight, xc, grad)
            grad_w = None
        else:
            grad_w = _weight_grad(grad, xc)
        return grad_x, None, grad_w, grad_b, None


class _Gemm(torch.autograd.Function):
    """y = x·Wᵀ + b, saving nothing: its backward passes dL/dy to `_SaveInputs`."""

    @staticmethod
    def forward(ctx, carrier, xc, wc, bc):  # noqa: ANN001, ANN205
        with torch.autocast(xc.device.type, enabled=False):
            return F.linear(xc, wc, bc)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad, None, None, None


def _deferred_linear(x: torch.Tensor, weight: torch.nn.Parameter, bias: torch.Tensor | None,
                     store: WeightGradStore, key: Any) -> torch.Tensor:
    """F.linear whose weight gradient waits in `store` while it defers (in the autocast dtype, as
    autograd's linear under autocast computes it)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dtype) if dtype is not None else x  # differentiable: dL/dx flows back through the cast
        wc = weight.detach().to(dtype) if dtype is not None else weight.detach()
        bc = None if bias is None else (bias.detach().to(dtype) if dtype is not None else bias.detach())
    slot = _Slot(store, key, weight, bias is not None)
    carrier = _SaveInputs.apply(xc, wc, weight, bias, slot)
    return _Gemm.apply(carrier, xc.detach(), wc, bc)


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


class WeightGradStore(TorchFunctionMode):
    """Deferred weight gradients of one pipeline rank, per micro-batch key (micro-batch, chunk).

    Use `with store.recording(key):` around a chunk's forward, `with store.deferred():` around its I
    pass (an ordinary `backward`), and `store.flush(key)` for its W pass."""

    def __init__(self) -> None:
        super().__init__()
        self.deferring = False
        self._key: Any = None
        self._stash: dict[Any, list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.gemms = 0  # weight-gradient GEMMs run by `flush` (counted for the tests)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.linear and self._key is not None:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if weight.requires_grad:
                return _deferred_linear(x, weight, bias, self, self._key)
        return func(*args, **kwargs)

    def recording(self, key: Any) -> WeightGradStore:
        self._key = key
        return self

    def deferred(self) -> _Deferring:
        return _Deferring(self)

    def stash(self, key: Any, weight: torch.nn.Parameter, x: torch.Tensor, grad: torch.Tensor) -> None:
        self._stash[key].append((weight, x, grad))

    def pending(self, key: Any) -> int:
        return len(self._stash.get(key, ()))

    def flush(self, key: Any) -> None:
        """The W pass of one micro-batch: only its weight-gradient GEMMs, accumulated into `.grad`."""
        for weight, x, grad in self._stash.pop(key, ()):
            g = _weight_grad(grad, x).to(weight.dtype)
            self.gemms += 1
            if weight.grad is None:
                weight.grad = g
            else:
                weight.grad.add_(g)


class _Deferring:
    def __init__(self, store: WeightGradStore) -> None:
        self.store = store

    def __enter__(self) -> WeightGradStore:
        self.store.deferring = True
        return self.store

    def __exit__(self, *exc: Any) -> None:
        self.store.deferring = False
