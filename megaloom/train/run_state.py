"""What a run saves and how it goes on: the Trainer's checkpoint state, its save, and its resume from the run
directory's newest valid checkpoint (or checkpoint.load, or pretrained weights), exactly, in any layout.

`RunState` is a part of `megaloom.train.trainer.Trainer` (its base class): it reads the trainer's grid, model,
optimizer, loader, objective, hooks, checkpointer and console, and sets `step`, `skipped`, `pending`,
`loaded_from` and `own_checkpoint`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from megaloom.config import to_toml
from megaloom.model.dropout import LayoutDropout
from megaloom.train.checkpoint import (
    CheckpointError,
    check_model_keys,
    find_checkpoint,
    load,
    load_peft_run,
    read_manifest,
    saved_keys,
)
from megaloom.train.sharded_state import init_optimizer_state, model_entries, optimizer_entries, set_optimizer_step


class RunState:
    """Checkpoints and resume of a Trainer (see the module docstring)."""

    def layout(self) -> dict:
        p = self.cfg.parallel
        return {"tp": self.grid.tp, "pp": self.grid.pp, "dp": self.grid.dp, "zero": p.zero, "chunks": p.chunks,
                "world_size": self.grid.world_size}

    def checkpoint_state(self) -> dict:
        """This rank's part of everything a run needs to go on as if never stopped."""
        if self.sync.fsdp is not None:
            self.sync.fsdp.reshard()
        state: dict = model_entries(self.model, self.saved)
        if self.adapt is not None:
            state["peft_base"] = self.adapt.record  # which base model the adapters need
        moments, adam_step = optimizer_entries(self.model, self.optimizer)
        state.update(moments)
        for hook in self.step_hooks:
            state.update(hook.entries())
        state.update(self.objective.entries())
        pending = self.reduce_loss(torch.stack(self.pending)).tolist() if self.pending else []
        state["train"] = {  # the same on every rank: written once
            "step": self.step, "adam_step": adam_step, "skipped": self.skipped,
            "loader": self.loader.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "objective": self.objective.state_dict(),
            "pending_losses": pending,  # the next metrics row averages over steps from before the save too
        }
        state[f"rank/{self.grid.rank:05d}"] = {  # this rank's own random streams
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        return state

    def save(self) -> Path:
        self.phase = f"the checkpoint save of step {self.step}"
        self.own_checkpoint = self.checkpointer.save(self.step, self.checkpoint_state(), to_toml(self.cfg),
                                                     self.layout())
        return self.own_checkpoint

    def resume(self) -> None:
        """Continue from the run directory's newest valid checkpoint, else from checkpoint.load, else
        start fresh."""
        self.phase = "loading a checkpoint"
        ckpt = self.loaded_from = self._choose_checkpoint()
        if ckpt is None:
            if self.weights is not None:  # a fresh run from pretrained weights: the same pieces a checkpoint fills
                self.console.print(f"    loaded {self.weights(model_entries(self.model, self.base))}")
            self._adapted(fresh=True)
            self._truncate_metrics(0)
            return
        saved, group = saved_keys(ckpt), self.checkpointer.group
        full = "train" in saved  # else weights only (e.g. `megaloom convert` of a safetensors file)
        extra: dict = {}
        if full:
            init_optimizer_state(self.optimizer)
            extra.update(optimizer_entries(self.model, self.optimizer)[0])
            extra["train"] = None
            mine = f"rank/{self.grid.rank:05d}"
            if mine in saved:
                extra[mine] = None
        if self.adapt is not None:  # the checkpoint holds the adapters; the frozen base comes from its source
            missing = (f"checkpoint {ckpt} holds no adapters of a PEFT run (peft.method = '{self.cfg.peft.method}' "
                       "here); start it with model.pretrained instead")
            objects, said, peft_said = load_peft_run(ckpt, self.model, self.saved, self.base, self.adapt, self.weights,
                                                     group, extra, missing)
            if said:
                self.console.print(f"    loaded {said}")
            if peft_said:
                self.console.print(f"    peft: {peft_said}")
        else:
            state = model_entries(self.model, self.saved)
            check_model_keys(ckpt, state, group)
            with torch.no_grad():
                objects = load(ckpt, {**state, **extra}, group)
        if not full:
            self.console.print(f"    loaded the weights of {ckpt} (no optimizer state: starting at step 0)")
            self._truncate_metrics(0)
            return
        train = objects["train"]
        self.step, self.skipped = int(train["step"]), int(train["skipped"])
        set_optimizer_step(self.optimizer, train["adam_step"])
        self.loader.load_state_dict(train["loader"])
        self.objective.load_state_dict(train.get("objective") or {})
        if self.scaler is not None and train["scaler"] is not None:
            self.scaler.load_state_dict(train["scaler"])
        self.pending = [torch.tensor(v, device=self.device) for v in train["pending_losses"]]
        same_layout = read_manifest(ckpt).get("layout") == self.layout()
        mine = objects.get(f"rank/{self.grid.rank:05d}")
        if same_layout and mine is not None:  # the per-rank random streams continue exactly
            rng = mine["rng"]
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        for m in self.model.modules():  # every training step ran each dropout site once per micro-batch
            if isinstance(m, LayoutDropout):
                m.calls = self.step * m.per_replica * m.uses
        self._truncate_metrics(self.step)
        own = ckpt.parent.parent.resolve() == self.run_dir.resolve()
        self.own_checkpoint = ckpt if own else None
        self.console.print(f"    {'resumed' if own else 'loaded'} {ckpt} at step {self.step}"
                           f"{'' if same_layout else ' (saved in another layout: resharded)'}")

    def _adapted(self, fresh: bool) -> None:
        """The base holds its final weights: the PEFT hook's last steps (peft.init, DoRA's magnitudes, NF4)."""
        if self.adapt is not None:
            said = self.adapt.loaded(self.model, fresh)
            if said:
                self.console.print(f"    peft: {said}")

    def fill_start_weights(self, model: torch.nn.Module, select: Callable | None = None) -> None:
        """Fill `model`, another model of this config built on this grid (DPO's frozen reference), with the
        weights this run started from: checkpoint.load's checkpoint, else model.pretrained, else nothing (the
        seed's initialisation, which it already has). `select(param)`: only those parameters (a separate
        PPO critic's frozen base, not its adapters or value head). Collective."""
        state = model_entries(model, select)
        if self.cfg.checkpoint.load:
            share, gather = (self.grid.rank, self.grid.world_size), self.checkpointer.gather
            ckpt = find_checkpoint(Path(self.cfg.checkpoint.load), share=share, gather=gather)
            check_model_keys(ckpt, state, self.checkpointer.group, extra_ok=self.objective.new_parameters)
            with torch.no_grad():
                load(ckpt, state, self.checkpointer.group)
        elif self.weights is not None:
            self.weights(state)

    def _choose_checkpoint(self) -> Path | None:
        """Every rank verifies its share of the candidates' files (sizes and checksums against the
        manifest); all agree on the newest valid one. The run directory's own comes first."""
        say = (lambda msg: self.console.print(f"    {msg}")) if self.main else None  # noqa: E731
        share, gather = (self.grid.rank, self.grid.world_size), self.checkpointer.gather
        ckpt = find_checkpoint(self.run_dir, report=say, share=share, gather=gather)
        if ckpt is None and self.cfg.checkpoint.load:
            source = Path(self.cfg.checkpoint.load)
            if not source.exists():
                raise CheckpointError(f"checkpoint.load = '{source}' does not exist; pass a checkpoint or run directory")
            ckpt = find_checkpoint(source, report=say, share=share, gather=gather)
            if ckpt is None:
                raise CheckpointError(f"checkpoint.load = '{source}' holds no valid checkpoint; pass a checkpoint "
                                      "directory with manifest.json or a run directory that saved one")
        return ckpt

    def _truncate_metrics(self, step: int) -> None:
        """Rows after the resumed step came from work that is redone: drop them, so every step has one row."""
        path = self.run_dir / "metrics.jsonl"
        if not self.main or not path.is_file():
            return
        rows = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
