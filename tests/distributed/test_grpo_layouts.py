"""train.objective = "grpo": rollouts sampled on the engine's own model (KV cache, tensor- and pipeline-
parallel), rewards from a Python function, group-normalised advantages, the GRPO loss with a k3 KL to a frozen
reference. The trainer's losses, gradient norms, rewards and KL at tp = 2, pp = 2 and dp = 2 equal the single-
process run (step 1 to 1e-5, later steps 1e-4; the same prompts, the same sampling seeds, so the same
completions); one launch. The
loss and its estimators equal TRL's / torchtune's: tests/unit/test_align_rl.py."""

import json
import shutil

import pytest

from megaloom.observe.metrics import read_metrics

from .launch import run_workers, train_config, train_configs


def vowel_share(completion: str, record: dict) -> float:
    """A reward that varies within a group: the share of vowels in the completion, scaled by the record."""
    letters = [c for c in completion if c.isalpha()]
    return record["scale"] * sum(c in "aeiou" for c in letters) / max(1, len(letters))


def _sets(tmp, *extra):
    return ["model.family='llama'", "model.layers=2", "model.hidden=32", "model.heads=4", "model.vocab_size=320",
            "model.seq_len=48", "train.objective='grpo'", f"data.sources=['{tmp / 'prompts.jsonl'}']",
            f"data.dir='{tmp / 'corpus'}'", "data.vocab_size=300", "data.val_fraction=0.2",
            "rl.reward='tests.distributed.test_grpo_layouts:vowel_share'", "rl.group_size=4", "rl.max_new_tokens=6",
            "rl.beta=0.05", "train.global_batch=4", "train.micro_batch=2", "train.steps=3", "train.eval_every=3",
            "train.eval_batches=1", "train.warmup=1", "train.lr=0.01", "log.every=1", "log.progress=false",
            "log.tensorboard=false", "log.plot=false", *extra]




def test_grpo_and_ppo_layouts_equal_one_process(tmp_path):
    """GRPO (with a k3 KL to the reference) and PPO (a value head, GAE, an adaptive KL coefficient, two epochs over
    each rollout, an entropy bonus) at tp = 2, pp = 2, dp = 2 equal one process, PPO at dp = 2 also with two
    mini-batches per rollout; a PPO run resumed from a checkpoint taken in the middle of a rollout continues
    exactly (the rollout and the KL coefficient are in it), also at dp = 2 from a one-process checkpoint."""
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": " ".join(words[i % 8:i % 8 + 3]), "scale": 1 + i % 3}) + "\n")
    single = tmp_path / "single"
    train_config(_sets(tmp_path), single)
    rows = read_metrics(single)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["reward_std"] > 0 for r in rows)  # the groups differ: the advantages are not all zero
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # the policy leaves the reference
    assert all(r["grad_norm"] > 0 for r in rows) and "val_reward" in rows[-1]
    ppo_single = tmp_path / "ppo-single"
    train_config(_ppo_sets(tmp_path, "checkpoint.every=1", "checkpoint.keep=4"), ppo_single)
    ppo = read_metrics(ppo_single)
    assert [r["step"] for r in ppo] == [1, 2, 3, 4]
    assert ppo[0]["kl"] == pytest.approx(0.0, abs=1e-6) and ppo[0]["value_loss"] > 0
    # a rollout every second step (one mini-batch, two epochs): its metrics only on those steps
    assert "kl" in ppo[2] and "kl" not in ppo[1] and "value_loss" in ppo[1]
    assert ppo[2]["kl_coef"] != ppo[0]["kl_coef"]  # the second rollout's coefficient was adapted
    # the run as a job killed in step 4 leaves it: step 3's checkpoint holds the second rollout, half used
    resumed = tmp_path / "ppo-resumed"
    shutil.copytree(ppo_single, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    train_config(_ppo_sets(tmp_path, "checkpoint.every=1", "checkpoint.keep=4"), resumed)
    _equal(ppo, read_metrics(resumed), ("loss", "grad_norm", "kl_coef", "value_loss", "entropy"), "ppo-resumed")
    # two mini-batches per rollout (4 prompts, 2 per step, two epochs: one rollout in the 4 steps): mini-batch k is
    # the same prompts in every layout; a dp = 2 run resumed from the one-process checkpoint of step 1 goes on with
    # mini-batch 1, read from the rows the one process wrote
    mb_sets = _ppo_sets(tmp_path, "rl.rollout_batch=4", "checkpoint.every=1", "checkpoint.keep=4")
    train_config(mb_sets, tmp_path / "ppo-mb")
    mb = read_metrics(tmp_path / "ppo-mb")
    assert "kl" in mb[0] and not any("kl" in r for r in mb[1:])  # one rollout
    shutil.copytree(tmp_path / "ppo-mb", tmp_path / "ppo-mb-dp2-resumed")
    for step in (2, 3, 4):
        shutil.rmtree(tmp_path / "ppo-mb-dp2-resumed" / "checkpoints" / f"step_{step:08d}")

    layouts = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": ["parallel.dp=2"]}
    ppo_layouts = {"ppo-tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"], "ppo-pp2": ["parallel.pp=2"],
                   "ppo-dp2": ["parallel.dp=2"]}
    runs = [(_sets(tmp_path, *extra), tmp_path / name) for name, extra in layouts.items()]
    runs += [(_ppo_sets(tmp_path, *extra), tmp_path / name) for name, extra in ppo_layouts.items()]
    runs += [(mb_sets + ["parallel.dp=2"], tmp_path / name) for name in ("ppo-mb-dp2", "ppo-mb-dp2-resumed")]
    run_workers(train_configs, 2, runs, timeout=500)
    for name in ("ppo-mb-dp2", "ppo-mb-dp2-resumed"):
        _equal(mb, read_metrics(tmp_path / name),
               ("loss", "grad_norm", "reward", "kl", "kl_coef", "value_loss", "entropy", "clip_fraction"), name)
    for name in ppo_layouts:
        _equal(ppo, read_metrics(tmp_path / name),
               ("loss", "grad_norm", "reward", "kl", "kl_coef", "value_loss", "entropy", "clip_fraction"), name)
    for name in layouts:
        ours = read_metrics(tmp_path / name)
        assert [r["step"] for r in ours] == [1, 2, 3], name
        for a, b in zip(rows, ours):
            # step 1 to 1e-5; after updates at lr 1e-2 the tp run's other reduction order has reached 2e-5 by
            # step 3 (seen once in about 17 runs), so later steps to 1e-4, still far below a wrong term's percents
            tol = 1e-5 if a["step"] == 1 else 1e-4
            for key in ("loss", "grad_norm", "reward", "kl", "completion_tokens"):
                assert b[key] == pytest.approx(a[key], rel=tol, abs=tol), (name, key, a["step"])
        assert ours[-1]["val_reward"] == pytest.approx(rows[-1]["val_reward"], abs=1e-6), name


def _ppo_sets(tmp, *extra):
    replaced = ("train.objective", "rl.beta", "rl.group_size", "train.micro_batch", "train.global_batch", "train.steps")
    base = [s for s in _sets(tmp) if not s.startswith(replaced)]
    return base + ["train.objective='ppo'", "rl.group_size=2", "train.global_batch=2", "train.micro_batch=1",
                   "rl.rollout_batch=2", "rl.ppo_epochs=2", "train.steps=4", "rl.kl_coef=0.1", "rl.kl_target=0.01",
                   "rl.kl_horizon=100", "rl.entropy_coef=0.01", "train.eval_every=4", *extra]


def _equal(ref, ours, keys, name, tol=1e-4):
    """PPO's four updates at lr 1e-2 with an adaptive KL coefficient amplify the rounding of a different
    reduction order (sequence parallelism sums partial value losses over tp) to about 3e-5 by the last step:
    1e-4 here, still far below what a wrong advantage, value or KL term changes (percents)."""
    assert [r["step"] for r in ours] == [r["step"] for r in ref], name
    for a, b in zip(ref, ours):
        for key in keys:
            assert (key in a) == (key in b), (name, key, a["step"])
            if key in a:  # PPO's rollout metrics are only on the steps that made a rollout
                assert b[key] == pytest.approx(a[key], rel=tol, abs=tol), (name, key, a["step"])
