"""A reward model's run directory as PPO's reward (megaloom/align/reward_model.py): a reward model trained with
LoRA on a pretrained base (its checkpoint holds the adapters and the score head only) is built by PPO with that
base and those adapters, frozen, and scores what the reward run's own model scores, to 1e-6; a fully trained
reward model (its checkpoint holds every weight) too. The PPO run uses another seed than the reward run."""

import json
from types import SimpleNamespace

import pytest
import torch

from megaloom.align.reward_model import load_reward_model, score
from megaloom.config import ConfigError
from megaloom.data.sft_loader import IGNORE_INDEX
from tests.distributed.launch import train_config
from tests.distributed.test_dpo_layouts import write_pairs
from tests.tiny_pretrained import make

LORA = ["peft.method='lora'", "peft.rank=4", "peft.targets=['q_proj','v_proj','o_proj','up_proj','down_proj']"]


def _common(tmp, base):
    return [f"model.pretrained='{base}'", "model.seq_len=48", "train.global_batch=2", "train.micro_batch=2",
            "train.steps=2", "train.warmup=0", "train.lr=0.01", "train.eval_every=0", "data.val_fraction=0.2",
            "train.samples=0", "log.every=1", "log.progress=false", "log.tensorboard=false", "log.plot=false"]


def _reward(tmp, base, name, *extra):
    sets = [*_common(tmp, base), "train.objective='reward'", f"data.sources=['{tmp / 'pairs.jsonl'}']",
            f"data.dir='{tmp / 'pairs-corpus'}'", "train.seed=5", *extra]
    return train_config(sets, tmp / name, config=tmp / "tiny.toml")


def _ppo(tmp, base, rm, name):
    sets = [*_common(tmp, base), "train.objective='ppo'", f"data.sources=['{tmp / 'prompts.jsonl'}']",
            f"data.dir='{tmp / 'prompt-corpus'}'", f"rl.reward='{rm}'", "rl.group_size=2", "rl.max_new_tokens=4",
            "train.steps=1", "train.micro_batch=1"]
    return train_config(sets, tmp / name, config=tmp / "tiny.toml")


def _rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of random tokens, the scored targets of each a different stretch (the last token differs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, vocab, (4, 48), generator=g)
    y = torch.full_like(x, IGNORE_INDEX)
    for i, (lo, hi) in enumerate([(10, 20), (5, 47), (30, 33), (0, 48)]):
        y[i, lo:hi] = x[i, lo:hi]
    return x, y


def test_lora_and_full_reward_runs_score_as_their_own_model(tmp_path):
    base = make("llama-tied", tmp_path / "base", layers=2)
    (tmp_path / "tiny.toml").write_text("[train]\nmin_lr = 0.001\n")  # the model section comes from the base
    write_pairs(tmp_path / "pairs.jsonl", 24)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"say {i}", "answer": str(i)}) + "\n")
    for name, extra in (("rm-lora", LORA), ("rm-full", [])):
        rm = _reward(tmp_path, base, name, *extra)
        lora = name == "rm-lora"
        names = {n for n, p in rm.model.named_parameters() if p.requires_grad}
        if lora:  # the checkpoint holds the adapters and the head, not the base
            assert "score.weight" in names and all("lora" in n or n == "score.weight" for n in names)
        x, y = _rows(rm.cfg.model.vocab_size)
        rm.model.eval()
        want = score(SimpleNamespace(model=rm.model, runner=None), x, y, "fp32")
        ppo = _ppo(tmp_path, base, tmp_path / name, f"ppo-{name}")
        assert ppo.cfg.train.seed != rm.cfg.train.seed
        got = score(ppo.objective.reward_model, x, y, "fp32")
        assert got.shape == (4,) and want.std() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        frozen = ppo.objective.reward_model.model
        assert not any(p.requires_grad for p in frozen.parameters())
        assert any("lora" in n for n, _ in frozen.named_parameters()) == lora
        if lora:  # without the factory of the command line the adapters cannot be built: one line saying so
            with pytest.raises(ConfigError, match="rl.reward = .* peft.method = 'lora'.*model_parts"):
                load_reward_model(ppo.cfg, ppo, None)
