"""train.objective = "grpo": group relative policy optimisation (Shao et al. 2024, DeepSeekMath §4) with
rollouts on the engine's own parallel model.

Each step takes `train.global_batch` prompts (`data.format = "prompt"`: rendered with the generation prompt,
each record kept for the reward); every data-parallel replica takes its share. For each prompt the policy
samples `rl.group_size` completions (`megaloom.eval.generate.generate_parallel`: a KV cache per model chunk,
tensor-parallel, carried through the pipeline by the runner under pipelining; the last stage samples and
broadcasts each token to the replica). Each completion gets a reward (`rl.reward`: built-in `exact_match`
against the record's `rl.answer_field`, or a Python `module:function`), the group's rewards are normalised
into advantages (`advantages.group_advantages`), and the micro-batches of (prompt + completion) rows go
through the training step as any objective's: the last stage computes each completion token's
log-probability with the vocab-parallel, chunked `token_logprobs` and the loss of `policy.grpo_loss`
(one update per generation, so π_old = π; plus β·k3 toward the reference when `rl.beta` > 0, whose
log-probabilities come from megaloom/align/reference.py: the trained model with its adapters switched off
under LoRA-like PEFT, else a frozen copy of the starting weights on the same grid).

A micro-batch of `train.micro_batch` prompts is micro_batch·group_size rows. The sampling of prompt i of
epoch e uses the seed (train.seed, e, i), whichever replica generates it. Validation samples greedily
(every completion of a group is then the same) and reports `val_reward`: the accuracy of greedy decoding
under exact_match.

Metrics: `reward`, `reward_std` (within groups), `completion_tokens` (mean length), `kl` (β > 0),
`clip_fraction`, `generation_tokens_per_s` (the rollouts) beside the loop's `tokens_per_s`.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from megaloom.align.advantages import group_advantages
from megaloom.align.dpo import head_token_logprobs
from megaloom.align.policy import grpo_loss
from megaloom.align.reference import Reference, build_reference
from megaloom.align.reference import describe as describe_reference
from megaloom.config import Config, ConfigError
from megaloom.data.prepare import CorpusInfo
from megaloom.data.sft_loader import IGNORE_INDEX, SFTDataset
from megaloom.data.sources import DataError
from megaloom.data.tokenizer import load_tokenizer
from megaloom.parallel.comm import whole_sequence
from megaloom.train.objective import Micro, Objective

Reward = Callable[[str, dict], float]


def exact_match(completion: str, record: dict, field: str = "answer") -> float:
    """1.0 when the completion, stripped of surrounding whitespace and a final period, equals the record's
    answer (as a string, stripped), else 0.0."""
    if field not in record:
        raise DataError(f"rl.answer_field = \"{field}\" is not a field of the prompt record {sorted(record)}; set "
                        "rl.answer_field to the field that holds the answer")
    answer = str(record[field]).strip()
    return float(completion.strip().removesuffix(".").strip() == answer)


def last_number(completion: str, record: dict, field: str = "answer") -> float:
    """1.0 when the last integer written in the completion (a leading minus sign kept) equals the record's
    answer, else 0.0: "17 - 13 = 4" scores 1 for the answer 4 (small chat models restate the question)."""
    if field not in record:
        raise DataError(f"rl.answer_field = \"{field}\" is not a field of the prompt record {sorted(record)}; set "
                        "rl.answer_field to the field that holds the answer")
    numbers = re.findall(r"-?\d+", completion)
    return float(bool(numbers) and numbers[-1] == str(record[field]).strip())


def load_reward(spec: str, field: str) -> Reward:
    """`rl.reward`: exact_match, last_number, or "module:function" imported from the Python path."""
    if spec == "exact_match":
        return lambda completion, record: exact_match(completion, record, field)
    if spec == "last_number":
        return lambda completion, record: last_number(completion, record, field)
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rl.reward = \"{spec}\" cannot be imported ({e}); give \"module:function\" on the Python "
                          "path, or exact_match") from None
    return fn


class PromptLoader:
    """Endless batches of prompt indices, reshuffled every epoch as the other loaders are: the order of an
    epoch is a pure function of (seed, epoch) and each step takes the next `batch_size` prompts, so a resumed
    run and any layout draw the same prompts.

    A batch is `batch_size // minibatch` mini-batches of `minibatch` consecutive prompts (PPO's rollout of
    several optimizer steps; one for GRPO), and each data-parallel rank takes its contiguous slice of every
    mini-batch: rank r holds, for each mini-batch k, prompts k·m + r·m/dp ... k·m + (r+1)·m/dp - 1, so that
    mini-batch k is the same set of prompts in every layout (`shares` says where its rows sit in the batch)."""

    def __init__(self, n: int, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 minibatch: int | None = None):
        minibatch = minibatch or batch_size
        if minibatch % dp_size:
            raise DataError(f"train.global_batch: {minibatch} is not divisible by parallel.dp={dp_size}")
        if batch_size % minibatch:
            raise DataError(f"rl.rollout_batch: {batch_size} is not a multiple of train.global_batch={minibatch}")
        if n < batch_size:
            raise DataError(f"train.global_batch: the train split has {n} prompts, fewer than a batch of {batch_size}; "
                            "use more data or a smaller batch")
        self.n, self.batch_size, self.seed, self.dp_rank, self.dp_size = n, batch_size, seed, dp_rank, dp_size
        self.minibatch = minibatch
        self.num_docs = n
        self.epoch, self.step = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def shares(self) -> list[tuple[int, int, int]]:
        """(first, count, position) of each of this rank's slices: prompts [first, first + count) of its own
        batch are prompts [position, position + count) of the whole batch, one slice per mini-batch."""
        local = self.minibatch // self.dp_size
        return [(k * local, local, k * self.minibatch + self.dp_rank * local)
                for k in range(self.batch_size // self.minibatch)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt indices, epoch) of this rank's slices of the next global batch."""
        if (self.step + 1) * self.batch_size > self.n:
            self.epoch, self.step = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        start = self.step * self.batch_size
        self.step += 1
        picked = np.concatenate([self.order[start + position:start + position + count]
                                 for _, count, position in self.shares()])
        ids = torch.from_numpy(picked.astype(np.int64))
        return ids, torch.full_like(ids, self.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "n": self.n, "batch_size": self.batch_size,
                "minibatch": self.minibatch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n", "batch_size", "minibatch"):
            if key == "minibatch" and key not in state:  # checkpoints of older versions did not record it
                continue
            if state.get(key) != getattr(self, key):
                raise DataError(f"data loader state: {key}={state.get(key)} in the checkpoint but {getattr(self, key)} "
                                "now; resume with the settings and data it was saved with, or start a fresh run")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.order = self._order(self.epoch)


class RolloutObjective(Objective):
    """What GRPO and PPO share: prompts, sampling completions on the trained model, the reward, a frozen
    reference; `rollout` turns prompt indices into rows and rewards."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.rows = cfg.rl.group_size
        # a directory is a reward model's run (PPO), which scores the rollouts itself
        self.reward_fn = None if Path(cfg.rl.reward).is_dir() else load_reward(cfg.rl.reward, cfg.rl.answer_field)
        self.trainer: Any = None
        self.reference: Reference | None = None  # built in `start` when kl_weight() > 0

    # ------------------------------------------------------------------ data

    def check(self, corpus: CorpusInfo) -> None:
        if not corpus.prompts:
            raise ConfigError(f"train.objective = \"grpo\" samples from prompts, but {corpus.directory} holds "
                              "conversations; give {\"prompt\": ..., \"answer\": ...} records")
        if corpus.val_docs == 0:
            raise ConfigError(f"the validation split of {corpus.directory} holds no prompt; raise data.val_fraction")

    def open(self, corpus: CorpusInfo, grid: Any, pin_memory: bool) -> None:
        t = self.cfg.train
        self.train_data, self.val_data = SFTDataset(corpus.directory, "train"), SFTDataset(corpus.directory, "val")
        self.records = {split: [json.loads(line) for line in
                                (Path(corpus.directory) / f"{split}.records.jsonl").read_text("utf-8").splitlines()]
                        for split in ("train", "val")}
        self.tokenizer = load_tokenizer(corpus.tokenizer_dir)
        self.loader = PromptLoader(len(self.train_data), t.global_batch, t.seed, grid.dp_rank, grid.dp)
        self.is_last = grid.pp_rank == grid.pp - 1
        longest = int(max(self.train_data.lengths(10**9).max(), self.val_data.lengths(10**9).max()))
        if longest + self.cfg.rl.max_new_tokens > self.cfg.model.seq_len:
            raise ConfigError(f"the longest prompt ({longest} tokens) + rl.max_new_tokens ({self.cfg.rl.max_new_tokens}) "
                              f"exceeds model.seq_len ({self.cfg.model.seq_len}); raise model.seq_len or lower "
                              "rl.max_new_tokens")

    def eval_batches(self) -> list[Micro]:
        """The first validation prompts, train.micro_batch per batch (the last one repeats the first prompt)."""
        t = self.cfg.train
        n = min(len(self.val_data), t.micro_batch * t.eval_batches)
        ids = list(range(n)) + [0] * (-n % t.micro_batch)
        valid = [1] * n + [0] * (len(ids) - n)
        return [(torch.tensor(ids[i:i + t.micro_batch]), torch.tensor(valid[i:i + t.micro_batch]))
                for i in range(0, len(ids), t.micro_batch)]

    def describe(self) -> str:
        r = self.cfg.rl
        return (f"; {self.name.upper()}: {self.loader.num_docs:,} train prompts x {r.group_size} completion(s) of up "
                f"to {r.max_new_tokens} tokens, reward {r.reward}, "
                f"{f'KL {self.kl_weight()} to {describe_reference(self.cfg)}' if self.kl_weight() else 'no reference'}")

    def kl_weight(self) -> float:
        """The weight of the KL to the reference (0: no reference model is built)."""
        return self.cfg.rl.beta

    # ------------------------------------------------------------------ rollouts

    def start(self, trainer: Any) -> None:
        self.trainer = trainer
        if self.kl_weight() > 0:
            self.reference = build_reference(self.cfg, trainer)

    def side_models(self) -> dict:
        copy = self.reference.copy if self.reference is not None else None
        return {"reference": (copy.model, None)} if copy is not None else {}

    def rollout(self, batch: Micro, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt indices -> (inputs, targets, rewards) of `rl.group_size` sampled completions per prompt
        (greedy outside training): targets are the completion's tokens (up to and with eos), -100 elsewhere.
        Records `reward`, `reward_std`, `completion_tokens`, `generation_tokens_per_s`."""
        from megaloom.eval.generate import Sampling, generate_parallel

        ids, tag = batch  # tag: the epoch of each training prompt; 1 for a real validation prompt, 0 for filling
        trainer, r, seq_len = self.trainer, self.cfg.rl, self.cfg.model.seq_len
        data = self.train_data if split == "train" else self.val_data
        records = self.records[split]
        pm = trainer.parts
        device = trainer.device
        eos = self.tokenizer.eos_id
        rows, targets, rewards, lengths = [], [], [], []
        started, generated = time.perf_counter(), 0
        was_training = trainer.model.training
        for i, t in zip(ids.tolist(), tag.tolist()):
            start, end = data.bounds[i]
            prompt = [int(v) for v in data.tokens[start:end]]
            greedy = split != "train"
            sampling = Sampling(max_new_tokens=r.max_new_tokens, temperature=0.0 if greedy else r.temperature,
                                top_k=0, top_p=r.top_p,
                                seed=int(np.random.SeedSequence([self.cfg.train.seed, int(t), i]).generate_state(1)[0]))
            with whole_sequence(pm.tp):  # prompts of any length, then one token at a time
                out = generate_parallel(_Parts(pm), trainer.grid, prompt, r.group_size, sampling, device, eos,
                                        self.cfg.train.precision)
            for row in out:
                completion = row[len(prompt):]
                if eos in completion:
                    completion = completion[:completion.index(eos) + 1]  # the end of the turn is learnt too
                text = self.tokenizer.decode([c for c in completion if c != eos])
                valid = split == "train" or bool(t)
                rewards.append(self.reward_fn(text, records[i]) if valid and self.reward_fn is not None else 0.0)
                lengths.append(len(completion))
                generated += len(completion)
                full = prompt + completion
                x = full[:-1] + [eos] * (seq_len - len(full) + 1)
                y = [IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX] * (seq_len - len(full) + 1)
                rows.append(x[:seq_len])
                targets.append(y[:seq_len])
        if was_training:
            trainer.model.train()
        x = torch.tensor(rows, device=device)
        y = torch.tensor(targets, device=device)
        reward = torch.tensor(rewards, device=device)
        if self.is_last:
            elapsed = max(time.perf_counter() - started, 1e-9)
            groups = reward.view(-1, r.group_size)
            self.record(completion_tokens=float(np.mean(lengths)), generation_tokens_per_s=generated / elapsed)
            if self.reward_fn is not None:
                self.record(reward=reward.mean(), **({"reward_std": groups.std(dim=1).mean()} if r.group_size > 1 else {}))
        return x, y, reward

    @torch.no_grad()
    def _reference_logps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p_ref(target) per position from the reference (its per-token losses, negated); zeros on
        pipeline ranks that are not the last stage (which do not need them)."""
        from megaloom.precision import autocast

        ref, out = self.reference, []
        step = self.cfg.train.micro_batch * self.rows
        with ref.use():
            for xs, ys in zip(x.split(step), y.split(step)):
                if ref.runner is None:
                    with autocast(self.cfg.train.precision, x.device):
                        per_token = ref.model(xs, ys, reduction="none")
                else:
                    per_token = ref.runner.forward_outputs([(xs, ys)], self.cfg.train.precision,
                                                           [{"reduction": "none"}] * len(ref.runner.chunks))[0]
                out.append(torch.zeros(ys.shape, device=x.device) if per_token is None
                           else -per_token.float().masked_fill(ys == IGNORE_INDEX, 0.0))
        return torch.cat(out)

class GRPOObjective(RolloutObjective):
    """Prompts -> sampled groups of completions -> rewards -> the GRPO loss on the completions' tokens."""

    name = "grpo"
    metric_names = ("reward", "reward_std", "completion_tokens", "kl", "clip_fraction", "generation_tokens_per_s")

    def prepare(self, batch: Micro, split: str) -> Micro:
        """Prompt indices -> (inputs, targets, [advantage, reference log-prob per token...]) of the group rows:
        sample the completions, score them, normalise the rewards within each group."""
        x, y, reward = self.rollout(batch, split)
        r = self.cfg.rl
        advantages = group_advantages(reward, r.group_size, r.scale_rewards) if split == "train" \
            else torch.zeros_like(reward)
        ref = self._reference_logps(x, y) if self.reference is not None else torch.zeros(y.shape, device=x.device)
        return x, y, torch.cat([advantages[:, None], ref], dim=1)

    def call(self, model: nn.Module, inputs: torch.Tensor, micro: Micro, last: bool = True, **kwargs) -> torch.Tensor:
        if not last:
            return model(inputs, **kwargs)
        _, y, extra = micro
        advantages, ref = extra[:, 0], extra[:, 1:]
        r, vocab = self.cfg.rl, self.cfg.model.vocab_size

        def loss_of(head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
            targets = nn.functional.pad(y, (prepended, 0), value=IGNORE_INDEX) if prepended else y
            logps = head_token_logprobs(head, h, targets, vocab)[:, prepended:]
            mask = y != IGNORE_INDEX
            loss, metrics = grpo_loss(logps, advantages, mask, ref_logps=ref if self.reference is not None else None,
                                      beta=r.beta, clip=r.clip, aggregation=r.aggregation)
            self.record(**metrics)
            return loss

        return model(inputs, head_fn=loss_of, **kwargs)


class _Parts:
    """The trainer's parts as `generate_parallel` reads a ParallelModel (model, runner, tp)."""

    def __init__(self, parts: Any):
        self.model, self.runner, self.tp = parts.model, parts.runner, parts.tp
