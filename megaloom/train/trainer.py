"""The training loop of one process: data, model, optimizer, metrics, evaluation, samples (checkpoints and resume:
run_state.py)."""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaloom.config import Config, ConfigError, to_toml
from megaloom.data import load_tokenizer
from megaloom.data.prepare import CorpusInfo
from megaloom.errors import RunError
from megaloom.model import count_parameters, generate
from megaloom.observe.metrics import MetricsLogger, memory_report, peak_memory_gib
from megaloom.observe.plots import plot_loss
from megaloom.observe.progress import Console
from megaloom.parallel.comm import local
from megaloom.parallel.grid import ProcessGrid
from megaloom.perf.flops import model_flops_per_token
from megaloom.perf.hardware import peak_flops
from megaloom.precision import autocast
from megaloom.train.assemble import Adapt, setup_training
from megaloom.train.checkpoint import (
    Checkpointer,
)
from megaloom.train.objective import Objective, builtin_objective
from megaloom.train.optim import lr_at, set_lr
from megaloom.train.precision import DynamicLossScaler
from megaloom.train.run_state import RunState
from megaloom.train.sharded_state import (
    named_parameters,
)
from megaloom.train.step import train_step


class TrainingStopped(RunError):
    """The run cannot go on (repeated non-finite steps, a failed peer): one line that says why and what is kept."""


@dataclass
class RunResult:
    run_dir: Path
    first_loss: float
    final_loss: float
    final_val_loss: float
    checkpoint: Path
    samples: list[str]


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # dropout masks; parameters use their own seeded generators


class Trainer(RunState):
    def __init__(self, cfg: Config, run_dir: Path, corpus: CorpusInfo, console: Console,
                 grid: ProcessGrid, device: torch.device, weights: Callable[[dict], str] | None = None,
                 evals: Sequence[Callable[[Trainer], dict]] = (), objective: Objective | None = None,
                 adapt: Adapt | None = None, step_hooks: Sequence = (), quantize: Adapt | None = None):
        """`weights`: what a fresh run starts from instead of its random initialisation (model.pretrained:
        `megaloom.interop.PretrainedWeights`); it fills the pieces `model_entries` gives, in any layout.
        `evals`: run with each validation, each returns metrics for the row (train.eval_tasks:
        `megaloom.eval.training_evals`; passed in, since evaluation sits above the training loop).
        `objective`: what the run trains for (train.objective); lm and sft are built in, the objectives of
        higher layers (alignment, distillation) are passed in by the command line.
        `adapt`: peft.method's hook (`megaloom.tune.peft.PeftHook`): it adds the adapters to each model
        chunk; the base is frozen, filled by `weights` and never checkpointed, the checkpoints hold the
        trainable parameters and record the base they need (`adapt.record`, checked on load).
        `quantize`: [qat]'s hook (`megaloom.compress.qat.QATHook`): it puts fake-quantized linears in each
        model chunk as it is built, before the adapters; their parameters keep their names.
        `step_hooks`: objects with start(model, checkpoint, group) -> str (after loading), apply(model) (after each
        optimizer step) and entries() (more checkpoint entries): train.keep_sparsity's
        `megaloom.compress.sparsity.KeepSparsity`, passed in by the command line."""
        self.step_hooks = list(step_hooks)
        self.loaded_from: Path | None = None  # the checkpoint the run resumed from or loaded, if any
        self.evals = list(evals)
        self.cfg, self.run_dir, self.corpus, self.console = cfg, Path(run_dir), corpus, console
        self.grid, self.device = grid, device
        if cfg.model.pretrained and weights is None:
            raise ConfigError(f"model.pretrained = '{cfg.model.pretrained}' but no weights reader was given to the "
                              "trainer; pass megaloom.interop.PretrainedWeights(cfg.model) (megaloom train does)")
        self.weights = weights
        if cfg.peft.method != "none" and adapt is None:
            raise ConfigError(f"peft.method = '{cfg.peft.method}' but no adapter hook was given to the trainer; pass "
                              "megaloom.tune.peft.PeftHook(cfg) (megaloom train does)")
        self.adapt = adapt
        if cfg.qat.scheme != "none" and quantize is None:
            raise ConfigError(f"qat.scheme = '{cfg.qat.scheme}' but no fake-quantization hook was given to the trainer; "
                              "pass megaloom.compress.qat.QATHook(cfg) (megaloom train does)")
        # a PEFT run saves only what it trains; its pretrained weights fill only the frozen base
        peft = cfg.peft.method != "none"
        self.saved = (lambda p: p.requires_grad) if peft else None
        self.base = (lambda p: not p.requires_grad) if peft else None
        self.main = grid.rank == 0  # rank 0 writes the run directory and talks to the terminal
        m, t = cfg.model, cfg.train
        if corpus.vocab_size > m.vocab_size:
            raise ConfigError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's vocabulary "
                              f"({corpus.vocab_size}); set model.vocab_size={_round_up(corpus.vocab_size, 64)}")
        self.objective = objective or builtin_objective(cfg)
        if self.objective.name != t.objective:
            raise ConfigError(f"train.objective = \"{t.objective}\" but the trainer was given the "
                              f"\"{self.objective.name}\" objective; pass the one the config names")
        self.objective.check(corpus)
        seed_everything(t.seed)
        self.objective.open(corpus, grid, pin_memory=self.device.type == "cuda")
        self.loader = self.objective.loader
        hooks = [h for h in (quantize, adapt, self.objective.adapt_model) if h is not None]
        self.parts = setup_training(cfg, grid, self.device, adapt=(lambda chunk, tp: [h(chunk, tp) for h in hooks]))
        new = {id(p) for name, p in named_parameters(self.parts.model) if name.startswith(self.objective.new_parameters)}
        if new:  # the objective's own parameters (a reward head) start from train.seed, not from model.pretrained
            base = self.base or (lambda p: True)
            self.base = lambda p: base(p) and id(p) not in new
        self.tp, self.runner = self.parts.tp, self.parts.runner
        if self.runner is not None:
            self.runner.call = self.objective.call
            b, seq, hidden = self.runner.act_shape
            self.runner.act_shape = (b * self.objective.rows, seq, hidden)  # a micro-batch's sequences
        self.model, self.optimizer, self.sync = self.parts.model, self.parts.optimizer, self.parts.sync
        self.step_model = torch.compile(self.model) if t.compile else self.model
        self.scaler = DynamicLossScaler() if t.precision == "fp16" else None
        self.tokenizer = load_tokenizer(corpus.tokenizer_dir)
        self.flops_per_token = model_flops_per_token(m)
        self.peak = peak_flops(device_name(self.device), t.precision)
        self.step = 0
        self.last_logged = 0
        self.skipped = 0  # steps skipped for non-finite loss or gradients, in total
        self.consecutive_skips = 0
        self.pending: list[torch.Tensor] = []  # losses of the steps since the last metrics row
        self.phase = "start-up"  # what the run is doing, for the error when a peer fails
        self.own_checkpoint: Path | None = None  # the newest checkpoint in this run directory (resumed or saved)
        self.checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_, grid.rank,
                                         timeout_s=cfg.parallel.timeout_s)

    # ------------------------------------------------------------------ setup and loop

    def prepare_run_dir(self) -> None:
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(to_toml(self.cfg), encoding="utf-8")
        tok_dir = self.run_dir / "tokenizer"
        if not tok_dir.exists():
            shutil.copytree(self.corpus.tokenizer_dir, tok_dir)

    def run(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        self.prepare_run_dir()
        self.console.header(self.describe())
        self.resume()
        for hook in self.step_hooks:
            self.console.print(f"    {hook.start(self.model, self.loaded_from, self.checkpointer.group)}")
        self.phase = "the objective's start-up"
        self.objective.start(self)
        done_before = self.step >= t.steps  # a resumed run that had already finished
        logger = MetricsLogger(self.run_dir, tensorboard=cfg.log.tensorboard) if self.main else None
        tokens_per_step = t.global_batch * self.objective.rows * cfg.model.seq_len
        first_loss = final_loss = final_val = math.nan
        first_step = 1
        last_time = time.perf_counter()
        ckpt = None
        try:
            with self.console.progress(t.steps, enabled=cfg.log.progress) as bar:
                while self.step < t.steps:
                    result = self.one_step()
                    self.pending.append(result.loss)
                    self.step += 1
                    eval_now = self.step == t.steps or (t.eval_every and self.step % t.eval_every == 0)
                    if self.step == 1 or self.step % cfg.log.every == 0 or eval_now:
                        self.phase = f"the loss reduction for the metrics row of step {self.step}"
                        loss = self.reduce_loss(torch.stack(self.pending).mean()).item()  # one host sync per row
                        now = time.perf_counter()
                        tokens = len(self.pending) * tokens_per_step
                        row = self.metrics_row(loss, result.grad_norm, tokens / (now - last_time))
                        row.update(self.objective_metrics())
                        self.pending = []
                        if eval_now:
                            self.phase = f"the evaluation after step {self.step}"
                            with self.parts.comm_paused():  # comm_bytes counts training steps only
                                row["val_loss"] = final_val = self.evaluate()
                                row.update(self.objective_metrics("val_"))
                                for evaluate in self.evals:
                                    row.update(evaluate(self))
                        if logger is not None:
                            logger.log(row)
                        bar.update(self.step, row)
                        if math.isnan(first_loss):
                            first_loss, first_step = loss, self.step
                        final_loss = loss
                        last_time = time.perf_counter()  # evaluation time is not training time
                    if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < t.steps
                            and not self.consecutive_skips):  # never replace a checkpoint from before a fault
                        self.save()
            if logger is not None:
                logger.close()
            if done_before:
                self.console.print(f"    run already complete at step {self.step}; raise train.steps to continue")
                ckpt = self.own_checkpoint
            else:
                ckpt = self.save()
            self.checkpointer.wait()
        except RuntimeError as e:
            if self.grid.world_size == 1 or not _communication_failure(e):
                raise  # a bug, not a peer: the traceback is what helps
            raise self.peer_failure(e) from e
        if cfg.log.plot and self.main:
            plot_loss([self.run_dir], self.run_dir / "loss.png")
        samples = self.samples()
        self.console.summary(self.run_dir, first_loss, final_loss, final_val, ckpt, samples, first_step)
        return RunResult(self.run_dir, first_loss, final_loss, final_val, ckpt, samples)

    def one_step(self):
        t = self.cfg.train
        self.phase = f"training step {self.step + 1} (forward, backward, gradient reduction, update)"
        set_lr(self.optimizer, lr_at(self.step, t))
        batch = tuple(b.to(self.device, non_blocking=True) for b in self.loader.next_batch())  # (x, y, ...)
        batch = self.objective.prepare(batch, "train")
        micro = list(zip(*(b.split(t.micro_batch * self.objective.rows) for b in batch)))
        result = train_step(self.step_model, self.optimizer, micro, precision=t.precision,
                            scaler=self.scaler, grad_clip=t.grad_clip, sync=self.sync,
                            pipeline=self.runner, inject=self.fault_hook(), micro_loss=self.objective.micro_loss)
        if not result.skipped:
            for hook in self.step_hooks:
                hook.apply(self.model)
        if result.skipped:
            self.skipped += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= t.max_consecutive_skips:
                first = self.step + 2 - self.consecutive_skips
                self.checkpointer.wait()  # a save in the background is complete before it is named
                kept = self.own_checkpoint
                kept = f"checkpoint {kept} is from before the fault" if kept else "no checkpoint was saved"
                raise TrainingStopped(
                    f"steps {first}-{self.step + 1} had non-finite loss or gradients "
                    f"({self.consecutive_skips} in a row, train.max_consecutive_skips = {t.max_consecutive_skips}); "
                    f"stopped, {kept}; lower train.lr, check the data, or use train.precision=\"bf16\"")
        else:
            self.consecutive_skips = 0
        return result

    def metrics_row(self, loss: float, grad_norm: torch.Tensor, tokens_per_s: float) -> dict:
        row = {
            "step": self.step,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak if self.peak else None,
            "mem_gib": peak_memory_gib(self.device),
            "tokens": self.step * self.cfg.train.global_batch * self.objective.rows * self.cfg.model.seq_len,
            "skipped": self.skipped,
        }
        if self.scaler is not None:
            row["loss_scale"] = self.scaler.scale
        if self.grid.world_size > 1:
            # bytes this rank sent per step over the logged interval, by group (tp, pp, dp) and operation
            row["comm_bytes"] = self.parts.take_comm_bytes(max(1, self.step - self.last_logged))
        row["memory"] = memory_report(self.model, self.optimizer, self.device)
        for name, (model, optimizer) in self.objective.side_models().items():  # a reference copy, a critic, ...
            side = memory_report(model, optimizer, self.device)
            row["memory"][name] = {k: side[k] for k in ("params_gib", "grads_gib", "optimizer_gib")}
        self.last_logged = self.step
        return row

    # ------------------------------------------------------------------ evaluation, saving, sampling

    def reduce_loss(self, value: torch.Tensor) -> torch.Tensor:
        """Losses live on the last pipeline stage (0 elsewhere) of each replica: the sum over the pp
        group, then the mean over the dp group, gives every rank (rank 0 included) the batch's loss."""
        if self.grid.pp > 1:
            torch.distributed.all_reduce(value, group=self.grid.pp_group)
        if self.grid.dp > 1:
            torch.distributed.all_reduce(value, group=self.grid.dp_group)
            value = value / self.grid.dp
        return value

    def objective_metrics(self, prefix: str = "") -> dict:
        """The objective's own metrics (e.g. DPO's rewards/margin) over the micro-batches since the last
        call, reduced over the grid like the loss: one collective, on every rank."""
        names = self.objective.metric_names
        if not names:
            return {}
        owner = self.grid.pp_rank == self.grid.pp - 1  # the last stage computes the loss and its metrics
        values = self.reduce_loss(self.objective.take_metrics(self.device, owner)).tolist()
        return {prefix + name: v for name, v in zip(names, values) if not math.isnan(v)}

    @torch.no_grad()
    def evaluate(self) -> float:
        t = self.cfg.train
        self.model.eval()
        batches = [self.objective.prepare(tuple(b.to(self.device) for b in mb), "val")
                   for mb in self.objective.eval_batches()]
        if self.runner is not None:
            loss = self.runner.forward_only(batches, t.precision)
        else:
            losses = []
            for mb in batches:
                with autocast(t.precision, self.device):
                    losses.append(self.objective.micro_loss(self.model, mb).float())
            loss = torch.stack(losses).mean()
        loss = self.reduce_loss(loss)  # every replica evaluates the same batches: the mean is the same
        self.model.train()
        return loss.item()

    # ------------------------------------------------------------------ faults

    def fault_hook(self):
        """faults.*: the injection that fires in this step on this rank, if any (tests and drills)."""
        f, step, rank = self.cfg.faults, self.step + 1, self.grid.rank
        if f.nonfinite_steps and f.at_step <= step < f.at_step + f.nonfinite_steps:
            def poison(params):
                for p in params[:1]:
                    if p.grad is not None:
                        local(p.grad).view(-1)[0] = math.nan
            return poison
        kind = "kill" if f.kill_rank == rank else "hang" if f.hang_rank == rank else None
        if kind is None or step != f.at_step:
            return None
        marker = self.run_dir / "faults" / f"{kind}-rank{rank}-step{step}"
        if marker.exists():  # fired once already: a relaunched run goes past it
            return None

        def fire(params):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("fired\n")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:  # hang: never answer the peers
                time.sleep(3600)
        return fire

    def peer_failure(self, error: RuntimeError) -> Exception:
        """A failed collective (a dead or hung peer) as one line: which rank, doing what, who did not answer."""
        text = str(error).strip()
        first = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0]) if text else type(error).__name__  # gloo's source path
        silent = self.checkpointer.unresponsive_ranks(timeout_s=min(30.0, self.cfg.parallel.timeout_s))
        who = f"rank(s) {silent} did not respond" if silent else "no peer identified"
        c = self.grid.coords
        return TrainingStopped(
            f"rank {self.grid.rank} (tp_rank={c.tp}, dp_rank={c.dp}, pp_rank={c.pp}) failed in {self.phase}: "
            f"{first[:300]}; {who}. A peer probably died or hung (parallel.timeout_s = {self.cfg.parallel.timeout_s}); "
            f"relaunching resumes from the newest checkpoint")

    def samples(self) -> list[str]:
        t = self.cfg.train
        if self.grid.world_size > 1:
            return []  # sampling runs on one process: `megaloom generate RUN_DIR` reads the consolidated weights
        out = []
        gen = torch.Generator(device=self.device).manual_seed(t.seed)
        for i in range(t.samples):
            prompt = t.sample_prompts[i % len(t.sample_prompts)]
            ids = torch.tensor([self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]], device=self.device)
            with autocast(t.precision, self.device):
                seq = generate(self.model, ids, t.sample_tokens, temperature=0.8, top_k=50, generator=gen)
            out.append(self.tokenizer.decode(seq[0].tolist()))
        return out

    def describe(self) -> list[tuple[str, str]]:
        m, t = self.cfg.model, self.cfg.train
        accum = t.global_batch // t.micro_batch
        return [
            ("model", f"{m.family}, {count_parameters(m) / 1e6:.2f}M parameters (l={m.layers}, h={m.hidden}, "
                      f"a={m.heads}, s={m.seq_len}, V={m.vocab_size})"),
            ("data", f"{self.corpus.train_tokens:,} train / {self.corpus.val_tokens:,} validation tokens, "
                     f"{self.corpus.tokenizer} tokenizer ({self.corpus.vocab_size} tokens)"
                     + self.objective.describe()),
            ("batch", f"{t.global_batch} x {m.seq_len} tokens = {t.micro_batch} per micro-batch x {accum} accumulation"),
            ("grid", f"tp={self.grid.tp} pp={self.grid.pp} dp={self.grid.dp}"
                     f"{f', {self.cfg.parallel.schedule} schedule' if self.runner else ''}"
                     f"{f', ZeRO-{self.cfg.parallel.zero}' if self.cfg.parallel.zero else ''}"
                     f"{', sequence parallel' if self.cfg.parallel.sequence_parallel and self.tp else ''}"),
            ("device", f"{self.device}{' (' + device_name(self.device) + ')' if device_name(self.device) else ''}, "
                       f"{t.precision}"),
            ("run dir", str(self.run_dir)),
        ] + ([("peft", self.peft_summary())] if self.adapt is not None else [])

    def peft_summary(self) -> str:
        """What a parameter-efficient run trains: this rank's trainable and total parameters."""
        params = list(self.model.parameters())
        trained = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        p = self.cfg.peft
        return (f"{p.method}{f' r={p.rank}' if p.method in ('lora', 'dora') else ''}: {trained:,} trainable of "
                f"{total:,} parameters on this rank ({100 * trained / max(1, total):.2f}%), the base frozen")


def _communication_failure(e: RuntimeError) -> bool:
    """Whether an error came from torch.distributed's transport (gloo, NCCL) rather than from our code."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    markers = ("gloo", "Gloo", "NCCL", "Timed out", "timed out", "Connection closed", "Connection reset")
    return any(m in text for m in markers)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
