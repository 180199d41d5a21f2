"""train.objective = "distill": knowledge distillation from a frozen teacher on the parallel engine.

The teacher (`distill.teacher`: a run directory, checkpoint, Hugging Face directory or .gguf, read by
`megaloom.interop.load`) is a second model on the student's grid, built by `build_parallel_model(trainable=False)`
from the teacher's own model config in the student's (t, p, d) layout: its layers split over the same pipeline
stages (its own runner), its heads and vocabulary over the same tp group; it is replicated over dp (no ZeRO:
the student's last stage reads the teacher's head weight shard outside the teacher's forward). It must have the
student's tokenizer and vocabulary (checked before anything is built).

Each batch (`prepare`, forward only) gets the teacher's final hidden states, (rows, T, teacher hidden), on the
last pipeline stage, appended to the batch so that the pipeline cuts them into micro-batches with the tokens; the
student's last stage (`Transformer.forward(head_fn=...)`) then takes `distill_loss` of its own final hidden states
and head against the teacher's, both heads' logits formed a chunk of tokens at a time from their vocab-parallel
weight shards (megaloom/compress/distill_loss.py). No model's logits exist whole. Metrics: `distill/kd` (the
divergence) and `distill/ce` (the cross entropy on the data's targets), reduced over the grid like the loss.

`distill.init_from_teacher_layers = [i, j, ...]`: a fresh student (model.layers of them, the teacher's widths)
starts from those teacher layers plus the teacher's embedding, final norm and head (`TeacherLayers`, the
trainer's `weights`: it fills the student's pieces in any layout, as pretrained weights do).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megaloom.compress.distill_loss import distill_loss
from megaloom.config import Config, ConfigError, ModelConfig
from megaloom.data.prepare import CorpusInfo
from megaloom.data.sft_loader import IGNORE_INDEX
from megaloom.data.tokenizer import Tokenizer, load_tokenizer
from megaloom.parallel.comm import enter_tp
from megaloom.precision import autocast
from megaloom.train.objective import Micro, Objective, SFTObjective
from megaloom.train.sharded_state import Sharded

CHUNK = 256  # tokens per chunk of the loss: up to about nine fp32 (256, V/t) buffers at a time (450 MB at V = 49,152)


class Teacher:
    """The teacher's config (its model in the student's layout) and checkpoint, resolved and checked against the
    student before any model is built."""

    def __init__(self, cfg: Config):
        from megaloom.interop.load import resolve

        self.path = cfg.distill.teacher
        if not Path(self.path).exists():
            raise ConfigError(f"distill.teacher = '{self.path}' does not exist; give a run directory, checkpoint, "
                              "Hugging Face directory or .gguf file")
        own, self.ckpt = resolve(self.path)
        self.model = teacher_model(own.model, cfg.model)
        # the student's layout, grid and batch; no ZeRO (module text); the teacher's own layer split
        parallel = replace(cfg.parallel, zero=0, layers_per_stage=[])
        self.cfg = replace(cfg, model=self.model, parallel=parallel, peft=own.peft)
        p = cfg.parallel
        if self.model.layers < p.pp * p.chunks:
            raise ConfigError(f"the teacher has {self.model.layers} layers, fewer than the pipeline's parallel.pp x "
                              f"parallel.chunks = {p.pp * p.chunks} stages")
        for key, n in (("model.heads", self.model.heads), ("model.kv_heads", self.model.n_kv_heads)):
            if n % p.tp:
                raise ConfigError(f"the teacher's {key} = {n} is not a multiple of parallel.tp = {p.tp}")

    def tokenizer(self) -> Tokenizer:
        from megaloom.interop.load import tokenizer_of

        return tokenizer_of(self.path, self.ckpt)

    def build(self, grid: Any, device: torch.device) -> Any:
        """This rank's part of the frozen teacher, filled with its weights, in eval mode. Collective."""
        from megaloom.interop.load import _peft_hook, fill_model
        from megaloom.train.assemble import build_parallel_model

        adapt = _peft_hook(self.cfg)
        pm = build_parallel_model(self.cfg, grid, device, trainable=False, adapt=adapt)
        group = dist.new_group(backend="gloo") if dist.is_initialized() and grid.world_size > 1 else None
        fill_model(pm.model, self.cfg, self.ckpt, group, adapt)
        pm.model.eval()
        return pm


def teacher_model(teacher: ModelConfig, student: ModelConfig) -> ModelConfig:
    """The teacher's model config at the student's sequence length, or one line saying why it cannot be."""
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(f"the teacher has model.vocab_size = {teacher.vocab_size}, the student {student.vocab_size}: "
                          "distillation compares the two next-token distributions row by row; set model.vocab_size="
                          f"{teacher.vocab_size}")
    if student.seq_len > teacher.positions:
        raise ConfigError(f"model.seq_len = {student.seq_len} exceeds the teacher's {teacher.positions} positions; "
                          f"set model.seq_len={teacher.positions} or less")
    return replace(teacher, seq_len=student.seq_len, max_positions=teacher.positions, dropout=0.0)


def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """Why two tokenizers do not give the same ids to the same text (None: they do): their vocabularies (token
    strings or byte sequences and their ids) and special tokens, compared entry by entry."""
    def vocab(t: Tokenizer) -> dict:
        backend = t.backend
        if hasattr(backend, "get_vocab"):
            return backend.get_vocab(with_added_tokens=True)
        return {**backend._mergeable_ranks, **backend._special_tokens}  # tiktoken: the ranks are the vocabulary

    va, vb = vocab(a), vocab(b)
    if va != vb:
        diff = next((k for k in va if vb.get(k) != va[k]), None) or next(k for k in vb if k not in va)
        return f"{len(va)} and {len(vb)} entries, e.g. {diff!r} is {va.get(diff)} in one and {vb.get(diff)} in the other"
    if a.eos_id != b.eos_id:
        return f"end-of-text ids {a.eos_id} and {b.eos_id}"
    return None


class DistillObjective(Objective):
    """Text (data.sources as for "lm") -> alpha·CE + (1 - alpha)·divergence from the teacher (module text)."""

    name = "distill"
    metric_names = ("distill/kd", "distill/ce")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.teacher_spec = Teacher(cfg)  # checked now, before any model is built
        self.teacher: Any = None  # the ParallelModel, built in `start`
        self.precision = cfg.train.precision

    def check(self, corpus: CorpusInfo) -> None:
        super().check(corpus)
        diff = tokenizer_difference(load_tokenizer(corpus.tokenizer_dir), self.teacher_spec.tokenizer())
        if diff:
            raise ConfigError(f"distill.teacher = '{self.teacher_spec.path}' has another tokenizer than the corpus "
                              f"{corpus.directory} ({diff}); prepare the data with the teacher's (data.tokenizer = "
                              "\"pretrained\" for a Hugging Face or .gguf teacher, its run's data.* for a megaloom one)")

    def describe(self) -> str:
        o = self.cfg.distill
        loss = f"jsd, beta {o.beta}" if o.loss == "jsd" else o.loss
        init = f", student from teacher layers {o.init_from_teacher_layers}" if o.init_from_teacher_layers else ""
        return (super().describe() + f"; distillation ({loss}, temperature {o.temperature}, alpha {o.alpha}) from "
                f"{self.teacher_spec.path} ({self.teacher_spec.model.layers} layers){init}")

    def start(self, trainer: Any) -> None:
        self.teacher = self.teacher_spec.build(trainer.grid, trainer.device)

    # ------------------------------------------------------------------ the teacher's hidden states

    def prepare(self, batch: Micro, split: str) -> Micro:
        """(tokens, targets[, docs]) -> the same and the teacher's final hidden states (rows, T, teacher hidden),
        or (rows, 0) on a pipeline rank that is not the last stage."""
        x, y, *docs = batch
        rows = self.cfg.train.micro_batch * self.rows
        micros = list(zip(*(b.split(rows) for b in batch)))
        with torch.no_grad():
            if self.teacher.runner is None:
                out = []
                for micro in micros:
                    with autocast(self.precision, x.device):
                        out.append(self.teacher.model(micro[0], micro[1], docs=micro[2] if docs else None,
                                                      head_fn=_hidden))
            else:
                out = self.teacher.runner.forward_outputs(micros, self.precision,
                                                          [{"head_fn": _hidden}] * len(self.teacher.runner.chunks))
        if out[0] is None:
            return (*batch, x.new_zeros((x.shape[0], 0), dtype=torch.float32))
        return (*batch, torch.cat(out).float())

    # ------------------------------------------------------------------ the loss

    def call(self, model: nn.Module, inputs: torch.Tensor, micro: Micro, last: bool = True, **kwargs) -> torch.Tensor:
        *micro, teacher_h = micro
        if not last:
            return super().call(model, inputs, tuple(micro), last, **kwargs)
        _, y, *docs = micro
        if docs:
            kwargs = {**kwargs, "docs": docs[0]}
        o = self.cfg.distill
        theads = self.teacher.model[-1].head if self.teacher.runner is not None else self.teacher.model.head

        def loss_of(head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
            targets, th = y, teacher_h
            if prepended:  # virtual tokens (prompt tuning) predict nothing; the teacher has none
                targets = nn.functional.pad(y, (prepended, 0), value=IGNORE_INDEX)
                th = nn.functional.pad(teacher_h, (0, 0, prepended, 0))
            tp = getattr(head, "tp", None)
            start, real = (head.start, head.real) if tp is not None else (0, None)
            terms = distill_loss(enter_tp(h, tp) if tp is not None else h, _head_weight(head), th.to(h.dtype),
                                 _head_weight(theads), targets, loss=o.loss, beta=o.beta, temperature=o.temperature,
                                 alpha=o.alpha, group=tp, vocab_start=start, real=real, chunk=CHUNK)
            self.record(**{"distill/kd": terms.kd, "distill/ce": terms.ce})
            return terms.loss

        return model(inputs, head_fn=loss_of, **kwargs)


class ConversationDistillObjective(DistillObjective, SFTObjective):
    """distill.data = "conversations": the SFT objective's data (the loss on the assistant's tokens)."""


def distill_objective(cfg: Config) -> DistillObjective:
    """The objective of train.objective = "distill" for the data of distill.data."""
    return (ConversationDistillObjective if cfg.distill.data == "conversations" else DistillObjective)(cfg)


def _hidden(head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
    """The teacher's head_fn: its final hidden states, the whole sequence (gathered under sequence parallelism)."""
    tp = getattr(head, "tp", None)
    return enter_tp(h, tp) if tp is not None else h


def _head_weight(head: nn.Module) -> torch.Tensor:
    return head._tied[0].weight if head._tied else head.weight


# ---------------------------------------------------------------------- the student from teacher layers

class TeacherLayers:
    """The trainer's `weights` for distill.init_from_teacher_layers: fills a fresh student's pieces (any layout)
    with the teacher's embedding, final norm and head and, for student layer k, teacher layer ids[k]."""

    def __init__(self, cfg: Config, teacher: Teacher | None = None):
        self.ids = list(cfg.distill.init_from_teacher_layers)
        self.teacher = teacher or Teacher(cfg)
        t, s = self.teacher.model, cfg.model
        if max(self.ids) >= t.layers:
            raise ConfigError(f"distill.init_from_teacher_layers = {self.ids} names layer {max(self.ids)} but the "
                              f"teacher has {t.layers} (0..{t.layers - 1})")
        # the values the model is built from (0 kv_heads = heads, "auto" head = the family's, ...), by their keys
        same = {"family": "family", "hidden": "hidden", "heads": "heads", "kv_heads": "n_kv_heads",
                "ffn_hidden": "ffn", "vocab_size": "vocab_size", "head": "tied", "qkv_bias": "qkv_bias",
                "norm_eps": "norm_eps", "rope_theta": "rope_theta", "max_positions": "positions"}
        for key, attr in same.items():
            mine, theirs = getattr(s, attr), getattr(t, attr)
            if mine != theirs:
                value = ("'tied'" if theirs else "'untied'") if key == "head" else repr(theirs)
                raise ConfigError(f"distill.init_from_teacher_layers: the student's model.{key} differs from the "
                                  f"teacher's; a student made of teacher layers has the teacher's widths, set "
                                  f"model.{key}={value}")

    def rename(self, key: str) -> str:
        """The teacher's name of a student's entry (`model/layers.<k>.…` -> `model/layers.<ids[k]>.…`)."""
        if key.startswith("model/layers."):
            k, rest = key.removeprefix("model/layers.").split(".", 1)
            return f"model/layers.{self.ids[int(k)]}.{rest}"
        return key

    def __call__(self, state: dict[str, Sharded]) -> str:
        from megaloom.interop.fill import fill, pretrained_source
        from megaloom.train.checkpoint import load

        renamed = {self.rename(k): v for k, v in state.items()}
        if self.teacher.ckpt is None:  # a Hugging Face directory or .gguf: the teacher's model.pretrained
            fill(renamed, self.teacher.model, pretrained_source(self.teacher.model))
        else:
            with torch.no_grad():
                load(self.teacher.ckpt, renamed)
        return f"teacher layers {self.ids} of {self.teacher.path} with its embedding, final norm and head"
