"""The weight-gradient pass of zero-bubble pipelining (Qi et al. 2023, "Zero Bubble Pipeline
Parallelism", §2): the backward of a linear layer is two GEMMs, dL/dx = dL/dy·W (needed at once by the
previous stage: the I pass) and dL/dW = dL/dyᵀ·x (needed by nobody until the optimizer: the W pass).

`WeightGradStore` is a `TorchFunctionMode`: inside it every `F.linear` of a model chunk's forward
(plain `nn.Linear`, the column- and row-parallel linears) runs as `_DeferredLinear`, which keeps its
input, exactly what autograd keeps anyway. In the I pass its backward returns only dL/dx (and the
bias gradient, a cheap sum) and stashes (x, dL/dy, W) for this micro-batch; the W pass (`flush`) then
runs just the weight-gradient GEMMs from the stash and accumulates them into `.grad`. Nothing walks the
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


class _DeferredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, store, key):  # noqa: ANN001, ANN205
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        xc, wc = (x.to(dtype), weight.to(dtype)) if dtype is not None else (x, weight)
        bc = bias.to(dtype) if bias is not None and dtype is not None else bias
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.store, ctx.key, ctx.weight, ctx.has_bias = store, key, weight, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        xc, wc = ctx.saved_tensors
        grad_x = grad @ wc
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        if ctx.store.deferring:
            ctx.store.stash(ctx.key, ctx.weight, xc, grad)
            grad_w = None
        else:
            grad_w = _weight_grad(grad, xc)
        return grad_x, grad_w, grad_b, None, None


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
                return _DeferredLinear.apply(x, weight, bias, self, self._key)
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
