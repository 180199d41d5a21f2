"""PPO's critic with its own trunk (`rl.critic = "separate"`): a second model on the policy's grid.

InstructGPT (Ouyang et al. 2022, §3.5) initialises the value function from the reward model and trains it
apart from the policy; TRL's PPO trainer keeps a separate value model too. Here the critic is built like the
policy (`build_parallel_model` with the run's PEFT hook, if any: the same (t, p, d, ZeRO) layout, the same
adapters on its own frozen copy of the base), starts from the same start weights (`model.pretrained`,
`checkpoint.load` or the seed's initialisation) with its own value head `value` (hidden -> 1 on the last
stage, initialised as the shared head is), and its language-model head frozen (unused).

It has its own optimizer (AdamW of `train.*`, the policy's learning-rate schedule and gradient clipping,
its own gradient buffers, ZeRO sharding and gradient norm: `setup_training`), so the policy's optimizer and
checkpoint layout are those of any run. It is trained by the clipped value loss alone (`rl.vf_coef` weighs
the value loss only where it shares a loss with the policy: with Adam a constant factor on a loss of its own
would change nothing but the epsilon's share). Each training step, before the policy's update on a
mini-batch, the critic takes one step on the same mini-batch. Its trained parameters and Adam moments are
saved in the run's checkpoints under `critic/` (`critic/model/<name>`, `critic/optim/<name>/<moment>`) and
read back on resume; its step count is in the objective's state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaloom.data.sft_loader import IGNORE_INDEX
from megaloom.model.dropout import LayoutDropout
from megaloom.parallel.comm import enter_tp
from megaloom.precision import autocast
from megaloom.train.objective import Micro

PREFIX = "critic/"


class SeparateCritic:
    """The critic's model, optimizer and gradient sync on this rank (a `Training`), and its step count.
    `head(chunk, tp)` adds the value head; `call(model, inputs, micro, last, **kwargs)` is the value loss
    of a micro-batch (on the last stage; hidden states elsewhere), as an objective's `call`."""

    def __init__(self, cfg: Any, trainer: Any, head: Callable[[nn.Module, Any], None], call: Callable):
        from megaloom.train.assemble import build_parallel_model, setup_training
        from megaloom.train.sharded_state import named_parameters

        self.cfg, self.trainer, self.call, self.steps = cfg, trainer, call, 0
        hook = trainer.adapt

        def adapt(chunk: nn.Module, tp: Any) -> None:
            if hook is not None:
                hook(chunk, tp)
            if getattr(chunk, "last", False):
                head(chunk, tp)
                if chunk.head.weight is not None:  # the language-model head is unused
                    chunk.head.weight.requires_grad_(False)

        pm = build_parallel_model(cfg, trainer.grid, trainer.device, adapt=adapt)
        self.parts = setup_training(cfg, trainer.grid, trainer.device, model=pm)
        self.model, self.optimizer, self.runner = self.parts.model, self.parts.optimizer, self.parts.runner
        if self.runner is not None:
            self.runner.call = call
            b, seq, hidden = self.runner.act_shape
            self.runner.act_shape = (b * cfg.rl.group_size, seq, hidden)
        from megaloom.train.precision import DynamicLossScaler

        self.scaler = DynamicLossScaler() if cfg.train.precision == "fp16" else None
        # the start weights fill the frozen base (PEFT) or everything but the value head
        head_ids = {id(p) for name, p in named_parameters(self.model) if name.startswith("value.")}
        peft = cfg.peft.method != "none"
        trainer.fill_start_weights(self.model, lambda p: id(p) not in head_ids and (not p.requires_grad or not peft))
        if hook is not None:
            hook.loaded(self.model, fresh=True)  # DoRA's magnitudes, peft.init, an NF4 base: as the policy's

    def resume(self, ckpt: Path | None, steps: int) -> bool:
        """Read the critic's trained parameters and Adam moments from `ckpt` when it holds them (a run resumed
        at step > 0), and its step count; whether it did. Collective."""
        from megaloom.train.checkpoint import load, saved_keys
        from megaloom.train.sharded_state import init_optimizer_state, set_optimizer_step

        if ckpt is None or not any(k.startswith(PREFIX) for k in saved_keys(ckpt)):
            return False
        init_optimizer_state(self.optimizer)
        with torch.no_grad():
            load(ckpt, self._entries(), self.trainer.checkpointer.group)
        set_optimizer_step(self.optimizer, float(steps))
        self.steps = steps
        t = self.trainer.step
        for m in self.model.modules():  # every step trained the critic once per micro-batch, as the policy
            if isinstance(m, LayoutDropout):
                m.calls = t * m.per_replica * m.uses
        return True

    def _entries(self) -> dict:
        from megaloom.train.sharded_state import model_entries, optimizer_entries

        out = dict(model_entries(self.model, lambda p: p.requires_grad))
        out.update(optimizer_entries(self.model, self.optimizer)[0])
        return {PREFIX + k: v for k, v in out.items()}

    def entries(self) -> dict:
        """This rank's pieces of the critic's trained parameters and Adam moments, for the checkpoint."""
        if self.parts.sync.fsdp is not None:
            self.parts.sync.fsdp.reshard()
        return self._entries()

    @torch.no_grad()
    def values(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """V(s_t) per position (B, T), forward only, on the last pipeline stage (zeros on the others, which
        never read them)."""
        t = self.cfg.train
        was_training = self.model.training
        self.model.eval()

        def fn(head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
            tp = getattr(head, "tp", None)
            full = enter_tp(h, tp) if tp is not None and tp.sequence_parallel else h  # forward only
            return self._value_layer().forward(full[:, prepended:].float()).squeeze(-1)

        out, step = [], t.micro_batch * self.cfg.rl.group_size
        for xs, ys in zip(x.split(step), y.split(step)):
            if self.runner is None:
                with autocast(t.precision, x.device):
                    got = self.model(xs, ys, head_fn=fn)
            else:
                got = self.runner.forward_outputs([(xs, ys)], t.precision, [{"head_fn": fn}] * len(self.runner.chunks))[0]
            out.append(torch.zeros(ys.shape, device=x.device) if got is None else got.float())
        self.model.train(was_training)
        return torch.cat(out) * (y != IGNORE_INDEX)

    def _value_layer(self) -> nn.Module:
        chunk = self.model[-1] if isinstance(self.model, nn.ModuleList) else self.model
        return chunk.value

    def step(self, batch: Micro) -> torch.Tensor:
        """One optimizer step of the value loss over this rank's mini-batch (cut into micro-batches as the
        trainer cuts the policy's), at the policy's learning rate of this step; the gradient norm."""
        from megaloom.train.optim import lr_at, set_lr
        from megaloom.train.step import train_step

        t = self.cfg.train
        set_lr(self.optimizer, lr_at(self.trainer.step, t))
        micro = list(zip(*(b.split(t.micro_batch * self.cfg.rl.group_size) for b in batch)))
        result = train_step(self.model, self.optimizer, micro, precision=t.precision, scaler=self.scaler,
                            grad_clip=t.grad_clip, sync=self.parts.sync, pipeline=self.runner,
                            micro_loss=lambda model, mb: self.call(model, mb[0], mb))
        if not result.skipped:
            self.steps += 1
        return result.grad_norm
