"""Mixed precision: autocast contexts and dynamic loss scaling for fp16.

Parameters, gradients and optimizer state stay fp32 (they are the master weights); the forward and
backward matrix multiplies run in bf16/fp16 under autocast. fp16's narrow exponent range needs the
loss scaled up so small gradients do not flush to zero (Micikevicius et al. 2018, "Mixed Precision
Training", §3.2); the scale halves when an overflow (inf/nan gradient) is found — that step is
skipped — and doubles after `growth_interval` clean steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from megaloom.parallel.comm import local


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, min_scale: float = 1.0):
        self.scale = init_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, params: Iterable[torch.nn.Parameter],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        """Divide gradients by the scale in place; True when any gradient is inf or nan (on any rank
        that `reduce` combines the flag over)."""
        grads = [local(p.grad) for p in params if p.grad is not None]
        if not grads:
            return False
        torch._foreach_mul_(grads, 1.0 / self.scale)
        # one reduction and one host sync for all gradients
        found = torch.stack([torch.logical_not(torch.isfinite(g)).any() for g in grads]).any().float()
        if reduce is not None:
            found = reduce(found)
        return bool(found)

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
