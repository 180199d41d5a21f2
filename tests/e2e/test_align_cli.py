"""`megaloom train` with the alignment objectives end to end: a reward model trained on preference pairs from a
tiny pretrained model, then PPO of the same pretrained model whose reward is that reward model's run
directory (built frozen on the policy's grid and read at each completion's last token)."""

import json

import pytest

from megaloom.cli import main
from megaloom.observe.metrics import read_metrics
from tests.distributed.test_dpo_layouts import write_pairs
from tests.tiny_pretrained import make

COMMON = ["--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "log.plot=false",
          "--set", "log.every=1", "--set", "train.warmup=0", "--set", "data.val_fraction=0.2",
          "--set", "train.eval_batches=1"]


def test_reward_model_run_is_ppo_reward(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGALOOM_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "tiny.toml"  # the model section comes from model.pretrained
    config.write_text("[train]\nlr = 0.001\nmin_lr = 0.0001\nsamples = 0\n")
    base = make("llama-tied", tmp_path / "base", layers=2)
    write_pairs(tmp_path / "pairs.jsonl", 24)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"say {i}", "answer": str(i)}) + "\n")
    rm = tmp_path / "rm"
    assert main(["train", str(config), "--run-dir", str(rm),
                 "--set", f"model.pretrained='{base}'", "--set", "model.seq_len=48", "--set", "train.objective='reward'",
                 "--set", f"data.sources=['{tmp_path / 'pairs.jsonl'}']", "--set", "train.steps=2",
                 "--set", "train.global_batch=2", "--set", "train.micro_batch=2", *COMMON]) == 0
    ppo = tmp_path / "ppo"
    assert main(["train", str(config), "--run-dir", str(ppo),
                 "--set", f"model.pretrained='{base}'", "--set", "model.seq_len=48", "--set", "train.objective='ppo'",
                 "--set", f"data.sources=['{tmp_path / 'prompts.jsonl'}']", "--set", f"rl.reward='{rm}'",
                 "--set", "rl.group_size=2", "--set", "rl.max_new_tokens=4", "--set", "train.steps=2",
                 "--set", "train.global_batch=2", "--set", "train.micro_batch=1", *COMMON]) == 0
    rows = read_metrics(ppo)
    assert [r["step"] for r in rows] == [1, 2]
    # the reward model scores every completion: a real number (its head is random, so rarely exactly 0)
    assert rows[0]["reward"] != 0.0 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
