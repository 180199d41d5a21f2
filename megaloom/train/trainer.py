"""The training loop of one process: data, model, optimizer, metrics, evaluation, checkpoints, samples."""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaloom.config import Config, ConfigError, to_toml
from megaloom.data import BatchLoader, TokenDataset, load_tokenizer
from megaloom.data.loader import eval_batches
from megaloom.data.prepare import CorpusInfo
from megaloom.model import count_parameters, generate
from megaloom.observe.metrics import MetricsLogger, memory_report, peak_memory_gib
from megaloom.observe.plots import plot_loss
from megaloom.observe.progress import Console
from megaloom.parallel.grid import ProcessGrid
from megaloom.parallel.runtime import setup_training
from megaloom.perf.flops import model_flops_per_token
from megaloom.perf.hardware import peak_flops
from megaloom.train.checkpoint import save_checkpoint
from megaloom.train.optim import lr_at, set_lr
from megaloom.train.precision import DynamicLossScaler, autocast
from megaloom.train.step import train_step


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


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, corpus: CorpusInfo, console: Console,
                 grid: ProcessGrid, device: torch.device):
        self.cfg, self.run_dir, self.corpus, self.console = cfg, Path(run_dir), corpus, console
        self.grid, self.device = grid, device
        self.main = grid.rank == 0  # rank 0 writes the run directory and talks to the terminal
        m, t = cfg.model, cfg.train
        if corpus.vocab_size > m.vocab_size:
            raise ConfigError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's vocabulary "
                              f"({corpus.vocab_size}); set model.vocab_size={_round_up(corpus.vocab_size, 64)}")
        if corpus.val_tokens < m.seq_len + 1:
            raise ConfigError(f"the validation split of {corpus.directory} has {corpus.val_tokens} tokens, fewer than "
                              f"model.seq_len + 1 = {m.seq_len + 1}; raise data.val_fraction or add data")
        seed_everything(t.seed)
        self.train_data = TokenDataset(corpus.directory, "train")
        self.val_data = TokenDataset(corpus.directory, "val")
        # every data-parallel replica reads its slice of the same global batch
        self.loader = BatchLoader(self.train_data, m.seq_len, t.global_batch, seed=t.seed, dp_rank=grid.dp_rank,
                                  dp_size=grid.dp, pin_memory=self.device.type == "cuda")
        self.parts = setup_training(cfg, grid, self.device)
        self.tp, self.runner = self.parts.tp, self.parts.runner
        self.model, self.optimizer, self.sync = self.parts.model, self.parts.optimizer, self.parts.sync
        self.step_model = torch.compile(self.model) if t.compile else self.model
        self.scaler = DynamicLossScaler() if t.precision == "fp16" else None
        self.tokenizer = load_tokenizer(corpus.tokenizer_dir)
        self.flops_per_token = model_flops_per_token(m)
        self.peak = peak_flops(device_name(self.device), t.precision)
        self.step = 0
        self.last_logged = 0
        self.skipped = 0

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
        logger = MetricsLogger(self.run_dir, tensorboard=cfg.log.tensorboard) if self.main else None
        tokens_per_step = t.global_batch * cfg.model.seq_len
        pending: list[torch.Tensor] = []
        first_loss = final_loss = final_val = math.nan
        last_time = time.perf_counter()
        with self.console.progress(t.steps, enabled=cfg.log.progress) as bar:
            while self.step < t.steps:
                result = self.one_step()
                pending.append(result.loss)
                self.step += 1
                eval_now = self.step == t.steps or (t.eval_every and self.step % t.eval_every == 0)
                if self.step == 1 or self.step % cfg.log.every == 0 or eval_now:
                    loss = self.reduce_loss(torch.stack(pending).mean()).item()  # one host sync per interval
                    now = time.perf_counter()
                    tokens = len(pending) * tokens_per_step
                    row = self.metrics_row(loss, result.grad_norm, tokens / (now - last_time))
                    pending = []
                    if eval_now:
                        row["val_loss"] = final_val = self.evaluate()
                    if logger is not None:
                        logger.log(row)
                    bar.update(self.step, row)
                    first_loss = loss if self.step == 1 else first_loss
                    final_loss = loss
                    last_time = time.perf_counter()  # evaluation time is not training time
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < t.steps:
                    self.save()
        if logger is not None:
            logger.close()
        ckpt = self.save()
        if cfg.log.plot and self.main:
            plot_loss([self.run_dir], self.run_dir / "loss.png")
        samples = self.samples()
        self.console.summary(self.run_dir, first_loss, final_loss, final_val, ckpt, samples)
        return RunResult(self.run_dir, first_loss, final_loss, final_val, ckpt, samples)

    def one_step(self):
        t = self.cfg.train
        set_lr(self.optimizer, lr_at(self.step, t))
        x, y = self.loader.next_batch()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        micro = list(zip(x.split(t.micro_batch), y.split(t.micro_batch)))
        result = train_step(self.step_model, self.optimizer, micro, precision=t.precision,
                            scaler=self.scaler, grad_clip=t.grad_clip, sync=self.sync,
                            pipeline=self.runner)
        self.skipped += result.skipped
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
            "tokens": self.step * self.cfg.train.global_batch * self.cfg.model.seq_len,
            "skipped": self.skipped,
        }
        if self.scaler is not None:
            row["loss_scale"] = self.scaler.scale
        comm = {}
        if self.tp is not None:
            # bytes this rank sent per collective type, per step, over the logged interval
            comm = {f"tp_{op}": sent / max(1, self.step - self.last_logged) for op, sent in self.tp.counter.take().items()}
        if self.parts.dp_buffer is not None and self.grid.dp > 1:
            comm["dp_all_reduce"] = self.parts.dp_buffer.sent_bytes()
        if comm:
            row["comm_bytes"] = comm
        row["memory"] = memory_report(self.model, self.optimizer, self.device)
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

    @torch.no_grad()
    def evaluate(self) -> float:
        t, m = self.cfg.train, self.cfg.model
        self.model.eval()
        batches = [(x.to(self.device), y.to(self.device))
                   for x, y in eval_batches(self.val_data, m.seq_len, t.micro_batch, t.eval_batches)]
        if self.runner is not None:
            loss = self.runner.forward_only(batches, t.precision)
        else:
            losses = []
            for x, y in batches:
                with autocast(t.precision, self.device):
                    losses.append(self.model(x, y).float())
            loss = torch.stack(losses).mean()
        loss = self.reduce_loss(loss)  # every replica evaluates the same batches: the mean is the same
        self.model.train()
        return loss.item()

    def train_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "loader": self.loader.state_dict(),
            "skipped": self.skipped,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.train_state(), to_toml(self.cfg),
                               keep=self.cfg.checkpoint.keep, tp=self.tp, grid=self.grid)

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
                     f"{self.corpus.tokenizer} tokenizer ({self.corpus.vocab_size} tokens)"),
            ("batch", f"{t.global_batch} x {m.seq_len} tokens = {t.micro_batch} per micro-batch x {accum} accumulation"),
            ("grid", f"tp={self.grid.tp} pp={self.grid.pp} dp={self.grid.dp}"
                     f"{f', {self.cfg.parallel.schedule} schedule' if self.runner else ''}"
                     f"{f', ZeRO-{self.cfg.parallel.zero}' if self.cfg.parallel.zero else ''}"
                     f"{', sequence parallel' if self.cfg.parallel.sequence_parallel and self.tp else ''}"),
            ("device", f"{self.device}{' (' + device_name(self.device) + ')' if device_name(self.device) else ''}, "
                       f"{t.precision}"),
            ("run dir", str(self.run_dir)),
        ]


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
