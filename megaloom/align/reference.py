"""The reference policy of DPO, GRPO (rl.beta > 0) and PPO (rl.kl_coef > 0): the starting weights, frozen.

Two ways to hold it on this rank (`peft.reference`, docs/alignment.md):

- `adapters_off` (the default under LoRA, DoRA, (IA)^3 and Houlsby adapters): the trained model itself, run
  forward-only with its adapters switched off (the PEFT hook's `off`, megaloom/tune/peft.py) and in eval
  mode. The frozen base *is* the starting model, so no second model is built: TRL's
  `peft_model.disable_adapter()`. Under QLoRA the reference is the NF4 base the adapters train on.
- `copy`: a frozen copy of the starting weights on the same grid (`build_parallel_model(trainable=False)`:
  no gradients, no optimizer state), filled by `trainer.fill_start_weights`. Used without PEFT, and for
  prefix and prompt tuning, whose virtual tokens change the sequence and have no switch.

Either way the reference runs on every pipeline stage and tensor-parallel rank the trained model runs on,
with the same runner, so its log-probabilities come out on the last stage as the policy's do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from megaloom.config import SWITCHABLE_PEFT, Config


def adapters_off(cfg: Config) -> bool:
    """Whether the reference is the trained model with its adapters off (else a frozen copy)."""
    return cfg.peft.method in SWITCHABLE_PEFT and cfg.peft.reference != "copy"


def describe(cfg: Config) -> str:
    """The reference for the run's header line."""
    return f"the {cfg.peft.method} base with adapters off" if adapters_off(cfg) else "a frozen copy"


class Reference:
    """The reference on this rank: `model` and `runner` (None without pipelining) to run forward-only inside
    `use()`; `copy` is the frozen copy's ParallelModel, None when the reference is the trained model."""

    def __init__(self, model: nn.Module, runner: Any, off: Any = None, copy: Any = None):
        self.model, self.runner, self._off, self.copy = model, runner, off, copy

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Inside, `model` computes the reference: the trained model in eval mode with its adapters off (then
        restored), or the frozen copy as it is."""
        if self._off is None:
            yield
            return
        was_training = self.model.training
        self.model.eval()  # no dropout: the reference is the deterministic base
        try:
            with self._off(self.model):
                yield
        finally:
            self.model.train(was_training)


def build_reference(cfg: Config, trainer: Any) -> Reference:
    """The reference of a run whose trainer has set up its model (and loaded a checkpoint, if any).
    Collective: every rank calls it (a frozen copy is built and filled on the grid)."""
    if adapters_off(cfg):
        hook = trainer.adapt
        if hook is None or not getattr(hook, "switchable", False):
            raise ValueError(f"peft.method = '{cfg.peft.method}' but the trainer's adapter hook cannot switch its "
                             "adapters off; pass megaloom.tune.peft.PeftHook(cfg) (megaloom train does)")
        return Reference(trainer.model, trainer.runner, off=hook.off)
    from megaloom.train.assemble import build_parallel_model

    pm = build_parallel_model(cfg, trainer.grid, trainer.device, trainable=False)
    trainer.fill_start_weights(pm.model)
    pm.model.eval()
    return Reference(pm.model, pm.runner, copy=pm)
