"""Alignment under PEFT and PPO's separate critic (docs/alignment.md).

The reference of DPO and GRPO under LoRA / DoRA is the trained model with its adapters switched off
(peft.reference = "auto"): it equals the frozen-copy reference (peft.reference = "copy") and the precomputed one
to 1e-6, and no second model is built (no parameters beyond the trained model's are alive after the run). DPO
with LoRA at tp = 2, dp = 2 and pp = 2 and GRPO with LoRA and a KL term at tp = 2 equal one process to 1e-5.

PPO with rl.critic = "separate" (a second model with its own trunk, value head and optimizer) trains, a run
resumed from a checkpoint taken in the middle of a rollout continues exactly (the critic's weights and Adam
moments are in the checkpoint), and tp = 2 with sequence parallelism, pp = 2, and dp = 2 under ZeRO-1 and ZeRO-3
equal one process (the losses, values and gradient norms per step, and the critic's final parameters); a dp = 2
ZeRO-3 run resumed from its own checkpoint in the middle of a rollout continues exactly, and so does one resumed
at dp = 2 ZeRO-3 from the single process's checkpoint (the critic's state resharded). One launch of two
processes."""

import gc
import json
import shutil

import numpy as np
import pytest
import torch

from megaloom.observe.metrics import read_metrics
from megaloom.train.checkpoint import full_tensors

from . import test_dpo_layouts, test_grpo_layouts
from .launch import run_workers, train_config, train_configs

LORA = ["peft.method='lora'", "peft.rank=4", "peft.targets=['q_proj','v_proj','o_proj','up_proj','down_proj']"]
DORA = [s.replace("'lora'", "'dora'") for s in LORA]


def _dpo(tmp, *extra):
    return test_dpo_layouts._sets(tmp, *LORA, *extra)


def _grpo(tmp, *extra):
    return test_grpo_layouts._sets(tmp, *LORA, f"data.dir='{tmp / 'gcorpus'}'", *extra)


def _ppo(tmp, *extra):
    return test_grpo_layouts._ppo_sets(tmp, "rl.critic='separate'", f"data.dir='{tmp / 'gcorpus'}'", *extra)


def _close(ref, ours, keys, name, tol):
    assert [r["step"] for r in ours] == [r["step"] for r in ref], name
    for a, b in zip(ref, ours):
        for key in keys:
            assert (key in a) == (key in b), (name, key, a["step"])
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=tol, abs=tol), (name, key, a["step"])


def _train_then_resume(rank, world, runs, resumed):
    """A `run_workers` function: `runs` as `train_configs` trains them, then each (sets, source, run_dir) of
    `resumed`: `source`'s run directory copied without its step-4 checkpoint (a job killed in step 4), resumed."""
    train_configs(rank, world, runs)
    for sets, source, run_dir in resumed:
        if rank == 0:
            shutil.copytree(source, run_dir)
            shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
        torch.distributed.barrier()
        train_config(sets, run_dir, rank, world)


def _same_critic(ref, ours, name, tol):
    """The critic's trained parameters in the newest checkpoints of two runs, consolidated over their layouts."""
    a, b = (full_tensors(sorted((d / "checkpoints").iterdir())[-1], "critic/model/") for d in (ref, ours))
    assert a and sorted(a) == sorted(b), name
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=tol, atol=tol, msg=lambda m, k=key: f"{name} {k}: {m}")


def _parameters() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if type(o) is torch.nn.Parameter}


def _write_prompts(tmp):
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    with open(tmp / "prompts.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": " ".join(words[i % 8:i % 8 + 3]), "scale": 1 + i % 3}) + "\n")


DPO_KEYS = ("loss", "grad_norm", "rewards/margin", "rewards/chosen", "val_loss", "val_rewards/margin")
GRPO_KEYS = ("loss", "grad_norm", "reward", "kl", "completion_tokens")
PPO_KEYS = ("loss", "grad_norm", "reward", "kl", "kl_coef", "value_loss", "critic_grad_norm", "entropy")


def test_adapters_off_reference_and_separate_critic(tmp_path):
    test_dpo_layouts.write_pairs(tmp_path / "pairs.jsonl", 40)
    _write_prompts(tmp_path)

    # DPO + LoRA, the reference = the base with adapters off: no second model is alive
    before = _parameters()
    trainer = train_config(_dpo(tmp_path), tmp_path / "dpo-off")
    assert trainer.objective.reference.copy is None
    new = _parameters() - before
    assert new and new <= {id(p) for p in trainer.model.parameters()}
    del trainer
    off = read_metrics(tmp_path / "dpo-off")
    assert off[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # the policy starts as the reference
    assert off[-1]["rewards/margin"] > 0 and off[-1]["loss"] < np.log(2)  # ... and leaves it
    assert "reference" not in off[0]["memory"]
    copy = tmp_path / "dpo-copy"
    train_config(_dpo(tmp_path, "peft.reference='copy'"), copy)
    assert read_metrics(copy)[0]["memory"]["reference"]["params_gib"] > 0  # the copy is a second model
    _close(read_metrics(copy), off, DPO_KEYS, "dpo copy", 1e-6)
    train_config(_dpo(tmp_path, "dpo.precompute_reference=true"), tmp_path / "dpo-pre")
    _close(read_metrics(tmp_path / "dpo-pre"), off, DPO_KEYS, "dpo precomputed", 1e-6)
    for name, sets in (("dora-off", []), ("dora-copy", ["peft.reference='copy'"])):
        train_config(test_dpo_layouts._sets(tmp_path, *DORA, *sets), tmp_path / name)
    _close(read_metrics(tmp_path / "dora-copy"), read_metrics(tmp_path / "dora-off"), DPO_KEYS, "dora", 1e-6)

    # GRPO + LoRA with a k3 KL to the reference
    train_config(_grpo(tmp_path), tmp_path / "grpo-off")
    grpo = read_metrics(tmp_path / "grpo-off")
    assert grpo[0]["kl"] == pytest.approx(0.0, abs=1e-6) and grpo[-1]["kl"] > 0
    train_config(_grpo(tmp_path, "peft.reference='copy'"), tmp_path / "grpo-copy")
    _close(read_metrics(tmp_path / "grpo-copy"), grpo, GRPO_KEYS, "grpo copy", 1e-6)

    # PPO with a separate critic: it trains (its own gradient norm, a value loss), and resumes exactly
    ppo_dir = tmp_path / "ppo-single"
    trainer = train_config(_ppo(tmp_path, "checkpoint.every=1", "checkpoint.keep=4"), ppo_dir)
    critic = trainer.objective.critic
    assert critic is not None and not hasattr(trainer.model, "value") and critic.steps == 4
    del trainer, critic
    ppo = read_metrics(ppo_dir)
    assert all(r["critic_grad_norm"] > 0 and r["value_loss"] > 0 for r in ppo)
    assert ppo[0]["memory"]["critic"]["optimizer_gib"] > 0
    resumed = tmp_path / "ppo-resumed"  # killed in step 4: step 3's checkpoint holds the second rollout, half used
    shutil.copytree(ppo_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    train_config(_ppo(tmp_path, "checkpoint.every=1", "checkpoint.keep=4"), resumed)
    _close(ppo, read_metrics(resumed), PPO_KEYS, "ppo resumed", 1e-6)

    dpo_layouts = {"dpo-tp2": ["parallel.tp=2"], "dpo-dp2": ["parallel.dp=2"], "dpo-pp2": ["parallel.pp=2"]}
    ppo_layouts = {"ppo-tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"], "ppo-pp2": ["parallel.pp=2"],
                   "ppo-dp2-zero1": ["parallel.dp=2", "parallel.zero=1"],
                   "ppo-dp2-zero3": ["parallel.dp=2", "parallel.zero=3", "checkpoint.every=1", "checkpoint.keep=4"]}
    runs = [(_dpo(tmp_path, *extra), tmp_path / name) for name, extra in dpo_layouts.items()]
    runs.append((_grpo(tmp_path, "parallel.tp=2"), tmp_path / "grpo-tp2"))
    runs += [(_ppo(tmp_path, *extra), tmp_path / name) for name, extra in ppo_layouts.items()]
    zero3 = _ppo(tmp_path, *ppo_layouts["ppo-dp2-zero3"])
    # killed in step 4 at dp = 2 under ZeRO-3, resumed in the same layout; and the single process's step-3
    # checkpoint resumed at dp = 2 under ZeRO-3 (the critic's weights and Adam moments resharded)
    resumed = [(zero3, tmp_path / "ppo-dp2-zero3", tmp_path / "ppo-dp2-zero3-resumed"),
               (zero3, ppo_dir, tmp_path / "ppo-single-resumed-zero3")]
    run_workers(_train_then_resume, 2, runs, resumed, timeout=400)
    for name in dpo_layouts:
        _close(off, read_metrics(tmp_path / name), DPO_KEYS, name, 1e-5)
    _close(grpo, read_metrics(tmp_path / "grpo-tp2"), GRPO_KEYS, "grpo-tp2", 1e-5)
    for name in ppo_layouts:  # four updates at lr 1e-2: rounding of another reduction order, as test_grpo_layouts
        _close(ppo, read_metrics(tmp_path / name), PPO_KEYS, name, 1e-4)
    for name in ("ppo-dp2-zero1", "ppo-dp2-zero3"):
        _same_critic(ppo_dir, tmp_path / name, name, 1e-4)
    zero3_rows = read_metrics(tmp_path / "ppo-dp2-zero3")
    _close(zero3_rows, read_metrics(tmp_path / "ppo-dp2-zero3-resumed"), PPO_KEYS, "ppo-dp2-zero3 resumed", 1e-6)
    _same_critic(tmp_path / "ppo-dp2-zero3", tmp_path / "ppo-dp2-zero3-resumed", "ppo-dp2-zero3 resumed", 1e-6)
    _close(ppo, read_metrics(tmp_path / "ppo-single-resumed-zero3"), PPO_KEYS, "ppo-single resumed at zero3", 1e-4)
    _same_critic(ppo_dir, tmp_path / "ppo-single-resumed-zero3", "ppo-single resumed at zero3", 1e-4)
