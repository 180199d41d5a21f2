"""train.objective = "ppo": PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022) on the engine.

A rollout takes `rl.rollout_batch` prompts (this replica's share: its slice of each mini-batch), samples
`rl.group_size` completions each with the rollout machinery GRPO uses (megaloom/align/grpo.py), scores each
completion with `rl.reward` (a Python function as for GRPO, or a reward model's run directory: `train.objective =
"reward"`, built frozen on the same grid as its own run built it, PEFT adapters and pretrained base included, and
read at each completion's last token: megaloom/align/reward_model.py), and runs the policy forward-only once to
record, per completion token, its log-probability and its value. The per-token reward is the score on the last
token minus `kl_coef`·KL_t (k1) to the reference (megaloom/align/reference.py; `kl.kl_penalized_rewards`; the
coefficient fixed or, with `rl.kl_target`, adapted per rollout by `kl.AdaptiveKLController`); GAE
(`advantages.gae`, `rl.gamma`, `rl.lam`) gives advantages and returns; the advantages are whitened over the
rollout.

Then `rl.ppo_epochs` passes over the rollout, `train.global_batch` prompts' completions per optimizer step, in
order (no shuffling; mini-batch k is the same prompts in every data-parallel layout, each replica holding its
slice of each mini-batch: `PromptLoader.shares`): the loss is
`policy.ppo_policy_loss` (clipped surrogate, `rl.clip`) + `rl.vf_coef`·`policy.ppo_value_loss` (clipped at
`rl.value_clip` around the rollout's values) − `rl.entropy_coef`·entropy. With `rl.critic = "shared"` the
critic shares the policy's trunk: a value head `value` (hidden -> 1 on the last stage, from `train.seed`), so
one model, one optimizer. With `"separate"` it is a second model with its own trunk, head and optimizer
(megaloom/align/critic.py), trained by the value loss on the same mini-batch before each policy update; the
policy's loss is then the surrogate and the entropy bonus only.
A rollout that is in progress is saved in checkpoints (where it stands in the loader's state, its rows as
entries in the one-process order, each replica's slices at their places: `PPOObjective.entries`): a resumed
run, in any layout, goes on with the same rollout.

Metrics: `reward`, `completion_tokens`, `generation_tokens_per_s`, `kl`, `kl_coef`, `entropy`,
`clip_fraction`, `approx_kl`, `value_loss`, `value_clip_fraction`, and `critic_grad_norm` (a separate critic).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaloom.align.advantages import gae, masked_mean, masked_whiten
from megaloom.align.critic import SeparateCritic
from megaloom.align.dpo import head_token_logprobs
from megaloom.align.grpo import PromptLoader, RolloutObjective
from megaloom.align.kl import AdaptiveKLController, FixedKLController, kl_penalized_rewards
from megaloom.align.logprobs import token_logprobs_and_entropy
from megaloom.align.policy import ppo_policy_loss, ppo_value_loss
from megaloom.align.reward_model import Parts, load_reward_model, score
from megaloom.config import Config
from megaloom.data.sft_loader import IGNORE_INDEX
from megaloom.parallel.comm import enter_tp, sum_over_tp
from megaloom.precision import autocast
from megaloom.train.objective import Micro

FIELDS = ("old_logps", "old_values", "advantages", "returns", "ref_logps")
ROLLOUT = "rollout/"  # the checkpoint entries of the rollout in progress


class RolloutLoader(PromptLoader):
    """Prompts per rollout, and which mini-batch of the rollout each step trains on: a new rollout of
    `rollout` prompts every `steps_per_rollout` steps, this replica's slice of each of its `minibatch`-prompt
    mini-batches in turn (so its k-th part is its share of mini-batch k). Its state says where the rollout in
    progress stands; the rollout's rows themselves are this replica's own, so checkpoints hold them as tensors
    split over the data-parallel replicas (`PPOObjective.entries`), not in this state, which is the same on
    every rank."""

    def __init__(self, n: int, rollout: int, minibatch: int, epochs: int, seed: int, dp_rank: int, dp_size: int):
        super().__init__(n, rollout, seed, dp_rank, dp_size, minibatch)
        self.minibatches = rollout // minibatch
        self.steps_per_rollout = epochs * self.minibatches
        self.position = 0  # steps taken in the current rollout
        self.rows: dict[str, torch.Tensor] | None = None  # the current rollout (on the CPU)
        self.pending = False  # resumed in the middle of a rollout whose rows the objective has still to read

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt indices and epochs of a new rollout, or empty tensors while the current one lasts."""
        if self.rows is None or self.position == self.steps_per_rollout:
            self.position, self.rows = 0, None
            return super().next_batch()
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "position": self.position, "rollout": self.rows is not None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.position = int(state["position"])
        self.rows = state.get("rows")  # checkpoints of older versions held one replica's rows here
        self.pending = self.rows is None and bool(state.get("rollout"))


class PPOObjective(RolloutObjective):
    """Prompts -> rollouts scored by a reward -> several epochs of clipped policy and value updates."""

    name = "ppo"
    metric_names = ("reward", "completion_tokens", "generation_tokens_per_s", "kl", "kl_coef", "entropy",
                    "clip_fraction", "approx_kl", "value_loss", "value_clip_fraction", "critic_grad_norm")
    new_parameters = ("value.",)

    def __init__(self, cfg: Config, model_parts: Parts | None = None):
        """`model_parts(cfg)`: how a config's model is built from the layers above the training stack (its
        pretrained weights, PEFT and QAT hooks; `megaloom.cli.model_parts`), for a reward model's run directory
        that needs them (megaloom/align/reward_model.py)."""
        super().__init__(cfg)
        r = cfg.rl
        self.model_parts = model_parts
        self.reward_model: Any = None  # a reward model's run (rl.reward a directory), built in `start`
        self.critic: SeparateCritic | None = None  # rl.critic = "separate", built in `start`
        self.critic_steps = 0  # the separate critic's optimizer steps, from a checkpoint
        self.controller = (AdaptiveKLController(r.kl_coef, r.kl_target, r.kl_horizon) if r.kl_target
                           else FixedKLController(r.kl_coef))

    def kl_weight(self) -> float:
        return self.cfg.rl.kl_coef

    def state_dict(self) -> dict:
        return {"kl_coef": self.controller.value, **({"critic_steps": self.critic.steps} if self.critic else {})}

    def load_state_dict(self, state: dict) -> None:
        if "kl_coef" in state:
            self.controller.value = float(state["kl_coef"])
        self.critic_steps = int(state.get("critic_steps", 0))

    def entries(self) -> dict:
        """The separate critic's state, and the rollout in progress: each field a tensor over the whole rollout,
        rows (prompts x completions) in the one-process order of the prompts, of which each data-parallel replica
        holds its slice of every mini-batch (`PromptLoader.shares`), so that a run resumed in any layout reads its
        own. The statistics (log-probabilities, values, advantages...) are the last pipeline stage's: the others
        hold zeros."""
        out = self.critic.entries() if self.critic is not None else {}
        rows = self.loader.rows
        if rows is not None:
            out.update(self._rollout_entries(rows, self.trainer.grid))
        return out

    def _rollout_entries(self, rows: dict[str, torch.Tensor], grid: Any) -> dict:
        """One piece per mini-batch: this replica's rows of mini-batch k sit at their place in the whole
        rollout, in the one-process order (`PromptLoader.shares`)."""
        from megaloom.train.sharded_state import Piece, Sharded

        out, g = {}, self.rows  # rows per prompt
        for name, v in rows.items():
            if name in FIELDS and not self.is_last:  # zeros here: the last stage writes them
                continue
            full = (v.shape[0] * grid.dp, *v.shape[1:])
            rest = (0,) * (v.dim() - 1)
            out[f"{ROLLOUT}{name}"] = Sharded(full, [Piece(v[first * g:(first + count) * g], (position * g, *rest))
                                                     for first, count, position in self.loader.shares()])
        return out

    def _resume_rollout(self, trainer: Any) -> None:
        """The rows of the rollout in progress at the checkpoint the run resumed from: this replica's share.
        Collective."""
        from megaloom.train.checkpoint import load, saved_keys

        ckpt, grid = trainer.loaded_from, trainer.grid
        saved = saved_keys(ckpt)
        rows = {}
        for name in ("x", "y", *FIELDS):
            full = saved[f"{ROLLOUT}{name}"]
            dtype = torch.int64 if name in ("x", "y") else torch.float32
            rows[name] = torch.zeros((full[0] // grid.dp, *full[1:]), dtype=dtype)
        with torch.no_grad():
            load(ckpt, self._rollout_entries(rows, grid), trainer.checkpointer.group)
        self.loader.rows, self.loader.pending = rows, False

    def side_models(self) -> dict:
        out = super().side_models()
        if self.critic is not None:
            out["critic"] = (self.critic.model, self.critic.optimizer)
        if self.reward_model is not None:
            out["reward_model"] = (self.reward_model.model, None)
        return out

    def describe(self) -> str:
        return super().describe() + f", {self.cfg.rl.critic} critic"

    def open(self, corpus: Any, grid: Any, pin_memory: bool) -> None:
        super().open(corpus, grid, pin_memory)
        t, r = self.cfg.train, self.cfg.rl
        self.loader = RolloutLoader(len(self.train_data), r.rollout_batch or t.global_batch, t.global_batch,
                                    r.ppo_epochs, t.seed, grid.dp_rank, grid.dp)

    def adapt_model(self, chunk: nn.Module, tp: Any) -> None:
        """The value head on the policy's last stage when the critic shares its trunk."""
        if self.cfg.rl.critic == "shared":
            self.value_head(chunk, tp)

    def value_head(self, chunk: nn.Module, tp: Any) -> None:
        """A value head `value` on the last stage, from train.seed (the same in every layout)."""
        if not getattr(chunk, "last", False):
            return
        hidden = self.cfg.model.hidden
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 104729)
        chunk.value = nn.Linear(hidden, 1, bias=False, device=next(chunk.parameters()).device)
        with torch.no_grad():
            chunk.value.weight.copy_(torch.randn(1, hidden, generator=gen) / math.sqrt(hidden + 1))

    def start(self, trainer: Any) -> None:
        super().start(trainer)
        if self.cfg.rl.critic == "separate":
            self.critic = SeparateCritic(self.cfg, trainer, self.value_head, self.critic_call)
            if trainer.step > 0:
                self.critic.resume(trainer.loaded_from, self.critic_steps)
        if self.loader.pending:  # resumed in the middle of a rollout
            self._resume_rollout(trainer)
        if Path(self.cfg.rl.reward).is_dir():
            self.reward_model = load_reward_model(self.cfg, trainer, self.model_parts)

    # ------------------------------------------------------------------ rollouts

    def prepare(self, batch: Micro, split: str) -> Micro:
        loader: RolloutLoader = self.loader
        if split != "train":  # validation: the greedy completions' reward; no update is taken from them
            x, y, reward = self._scored_rollout(batch, split)
            zeros = torch.zeros(y.shape, device=x.device)
            return x, y, torch.stack([zeros] * len(FIELDS), dim=-1)
        if batch[0].numel():  # a new rollout
            loader.rows = {k: v.cpu() for k, v in self._new_rollout(batch).items()}
        rows, per = loader.rows, self.cfg.train.global_batch // self.trainer.grid.dp * self.rows
        k = loader.position % loader.minibatches
        loader.position += 1
        part = {name: v[k * per:(k + 1) * per].to(self.trainer.device) for name, v in rows.items()}
        batch = part["x"], part["y"], torch.stack([part[f] for f in FIELDS], dim=-1)
        if self.critic is not None:  # the critic's own step on the same mini-batch
            norm = self.critic.step(batch)
            if self.is_last:
                self.record(critic_grad_norm=norm)
        return batch

    def _scored_rollout(self, batch: Micro, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, reward = self.rollout(batch, split)
        if self.reward_model is not None:
            reward = score(self.reward_model, x, y, self.cfg.train.precision)
            if self.is_last:
                self.record(reward=reward.mean())
        return x, y, reward

    @torch.no_grad()
    def _new_rollout(self, batch: Micro) -> dict[str, torch.Tensor]:
        x, y, scores = self._scored_rollout(batch, "train")
        mask = y != IGNORE_INDEX
        logps, values = self._policy_stats(x, y)
        if self.critic is not None:
            values = self.critic.values(x, y)
        ref = self._reference_logps(x, y) if self.reference is not None else torch.zeros_like(logps)
        r = self.cfg.rl
        rewards, kl = kl_penalized_rewards(scores, logps, ref, self.controller.value, mask)
        advantages, returns = gae(rewards, values, mask, r.gamma, r.lam)
        if r.whiten_advantages:
            advantages = _whiten_over_replicas(advantages, mask, self.trainer.grid)
        # the mean KL per completion, as the controller reads it: the last stage's, averaged over the replicas, so
        # that every rank and every layout adapts the coefficient alike
        grid = self.trainer.grid
        mean_kl = kl.sum(-1).mean() * (1.0 if self.is_last else 0.0)
        if grid.pp > 1:
            torch.distributed.all_reduce(mean_kl, group=grid.pp_group)
        if grid.dp > 1:
            torch.distributed.all_reduce(mean_kl, group=grid.dp_group)
            mean_kl = mean_kl / grid.dp
        if self.is_last:
            self.record(kl=masked_mean(kl, mask), kl_coef=self.controller.value)
        self.controller.update(float(mean_kl), len(x) * grid.dp)
        return {"x": x, "y": y, "old_logps": logps, "old_values": values, "advantages": advantages,
                "returns": returns, "ref_logps": ref}

    def _policy_stats(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rollout-time log-probabilities and values of the policy per position (B, T), forward only;
        on every rank (a pipeline's last stage computes them, the others receive zeros: they never read them)."""
        trainer, vocab = self.trainer, self.cfg.model.vocab_size
        was_training = trainer.model.training
        trainer.model.eval()

        def stats(ys: torch.Tensor, head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
            targets = nn.functional.pad(ys, (prepended, 0), value=IGNORE_INDEX) if prepended else ys
            logps = head_token_logprobs(head, h, targets, vocab)[:, prepended:]
            if self.critic is not None:  # the values come from the critic's own forward
                return torch.stack([logps, torch.zeros_like(logps)], dim=-1)
            tp = getattr(head, "tp", None)
            full = enter_tp(h, tp) if tp is not None and tp.sequence_parallel else h  # forward only: no gradient
            values = self._value_layer().forward(full[:, prepended:].float()).squeeze(-1)
            return torch.stack([logps, values], dim=-1)

        out = []
        step = self.cfg.train.micro_batch * self.rows
        for xs, ys in zip(x.split(step), y.split(step)):
            fn = functools.partial(stats, ys)
            if trainer.runner is None:
                with autocast(self.cfg.train.precision, x.device):
                    got = trainer.model(xs, ys, head_fn=fn)
            else:
                got = trainer.runner.forward_outputs([(xs, ys)], self.cfg.train.precision,
                                                     [{"head_fn": fn}] * len(trainer.runner.chunks))[0]
            out.append(torch.zeros(*ys.shape, 2, device=x.device) if got is None else got.float())
        if was_training:
            trainer.model.train()
        both = torch.cat(out)
        mask = y != IGNORE_INDEX
        return both[..., 0] * mask, both[..., 1] * mask

    def _value_layer(self) -> nn.Module:
        model = self.trainer.model
        chunk = model[-1] if isinstance(model, nn.ModuleList) else model
        return chunk.value

    # ------------------------------------------------------------------ the loss

    def call(self, model: nn.Module, inputs: torch.Tensor, micro: Micro, last: bool = True, **kwargs) -> torch.Tensor:
        if not last:
            return model(inputs, **kwargs)
        _, y, extra = micro
        old_logps, old_values, advantages, returns, _ = extra.unbind(-1)
        r, vocab = self.cfg.rl, self.cfg.model.vocab_size
        value = model.value if self.critic is None else None

        def loss_of(head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
            targets = nn.functional.pad(y, (prepended, 0), value=IGNORE_INDEX) if prepended else y
            tp = getattr(head, "tp", None)
            weight = head._tied[0].weight if head._tied else head.weight
            if tp is None:
                logps, entropy = token_logprobs_and_entropy(h, targets, weight, vocab_size=vocab)
            else:
                logps, entropy = token_logprobs_and_entropy(enter_tp(h, tp), targets, weight, group=tp,
                                                            vocab_start=head.start, vocab_size=vocab)
            logps, entropy = logps[:, prepended:], entropy[:, prepended:]
            mask = y != IGNORE_INDEX
            policy, pm = ppo_policy_loss(logps, old_logps, advantages, mask, clip=r.clip)
            ent = masked_mean(entropy, mask)
            self.record(entropy=ent, **pm)
            if value is None:  # a separate critic learns the values in its own step
                return policy - r.entropy_coef * ent
            v_loss, vm = _value_loss(value, h, prepended, tp, old_values, returns, mask, r.value_clip)
            self.record(value_loss=v_loss, **vm)
            return policy + r.vf_coef * v_loss - r.entropy_coef * ent

        return model(inputs, head_fn=loss_of, **kwargs)

    def critic_call(self, model: nn.Module, inputs: torch.Tensor, micro: Micro, last: bool = True,
                    **kwargs) -> torch.Tensor:
        """A separate critic's `call`: the clipped value loss of its value head on its own final hidden states."""
        if not last:
            return model(inputs, **kwargs)
        _, y, extra = micro
        _, old_values, _, returns, _ = extra.unbind(-1)
        value, clip = model.value, self.cfg.rl.value_clip

        def loss_of(head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
            v_loss, vm = _value_loss(value, h, prepended, getattr(head, "tp", None), old_values, returns,
                                     y != IGNORE_INDEX, clip)
            self.record(value_loss=v_loss, **vm)
            return v_loss

        return model(inputs, head_fn=loss_of, **kwargs)


def _whiten_over_replicas(x: torch.Tensor, mask: torch.Tensor, grid: Any) -> torch.Tensor:
    """`advantages.masked_whiten` over the whole rollout of every data-parallel replica: the masked count,
    sum and sum of squares are summed over the dp group, so each replica whitens with the statistics a
    single process would compute over all the prompts."""
    m = mask.to(x.dtype)
    stats = torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])
    if grid.dp > 1:
        torch.distributed.all_reduce(stats, group=grid.dp_group)
    if grid.dp == 1:
        return masked_whiten(x, mask)
    n, total, squares = stats
    mean = total / n.clamp(min=1)
    var = (squares - n * mean * mean) / (n - 1).clamp(min=1)  # unbiased, as masked_whiten's
    return (x - mean) * torch.rsqrt(var + 1e-8) * m


def _value_loss(value: nn.Module, h: torch.Tensor, prepended: int, tp: Any, old_values: torch.Tensor,
                returns: torch.Tensor, mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped value loss of the value head on the final hidden states: whole on every tensor-parallel
    rank, or under sequence parallelism each rank's slice of the positions, whose partial means (weighted by
    their share of the masked tokens) are summed over the group."""
    if tp is not None and tp.sequence_parallel and tp.size > 1:
        t = h.shape[1]
        first = tp.rank * t - prepended
        lo, hi = max(first, 0), min(first + t, mask.shape[1])
        local = slice(lo - first, hi - first)
        values = value(h[:, local].float()).squeeze(-1)
        m, ov, ret = mask[:, lo:hi], old_values[:, lo:hi], returns[:, lo:hi]
        share = m.sum() / mask.sum().clamp(min=1)
        loss, metrics = ppo_value_loss(values, ov, ret, m, clip)
        return sum_over_tp(loss * share, tp), {k: sum_over_tp(v.detach() * share, tp) for k, v in metrics.items()}
    values = value(h[:, prepended:].float()).squeeze(-1)
    return ppo_value_loss(values, old_values, returns, mask, clip)
