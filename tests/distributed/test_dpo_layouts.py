"""train.objective = "dpo" and "reward" on the parallel engine: the trainer's losses, gradient norms, DPO /
reward metrics and validation losses at tp = 2, dp = 2, pp = 2 (DPO) and tp = 2 with sequence parallelism,
pp = 2 (reward) equal the single-process run to 1e-5; a DPO run whose reference log-probabilities were
precomputed once equals the frozen-reference run to 1e-6. One launch of two processes. The loss itself equals
TRL's / torchtune's: tests/unit/test_align_preference.py."""

import json

import numpy as np
import pytest
import torch

from megaloom.config import load_config
from megaloom.data.corpus import ensure_corpus_for
from megaloom.observe.metrics import read_metrics

from .launch import run_workers, train_config, train_configs


def write_pairs(path, n, seed=0):
    """n preference pairs: a prompt, a chosen and a rejected answer of random words (half the prompts chat
    messages, half strings)."""
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(words, 2 + i % 4))
            record = {"prompt": prompt if i % 2 else [{"role": "user", "content": prompt}],
                      "chosen": " ".join(rng.choice(words[:5], 1 + i % 5)),
                      "rejected": " ".join(rng.choice(words[5:], 1 + (i + 2) % 5))}
            f.write(json.dumps(record) + "\n")
    return path


def _sets(tmp, *extra):
    return ["model.family='llama'", "model.layers=2", "model.hidden=32", "model.heads=4", "model.vocab_size=320",
            "model.seq_len=32", "train.objective='dpo'", f"data.sources=['{tmp / 'pairs.jsonl'}']",
            f"data.dir='{tmp / 'corpus'}'", "data.vocab_size=300", "data.val_fraction=0.2", "dpo.beta=0.5",
            "train.global_batch=4", "train.micro_batch=2", "train.steps=3", "train.eval_every=3",
            "train.eval_batches=2", "train.warmup=1", "train.lr=0.002", "log.every=1", "log.progress=false",
            "log.tensorboard=false", "log.plot=false", *extra]




def _same(a_rows, b_rows, tol, name):
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows] == [1, 2, 3], name
    for a, b in zip(a_rows, b_rows):
        # at step 1 the policy is the reference: its rewards are rounding noise around 0, and which of a pair's
        # two is larger (the accuracy) is decided by that noise
        keys = ("loss", "grad_norm", "rewards/margin", "rewards/chosen") + (("rewards/accuracy",) if a["step"] > 1 else ())
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=tol, abs=tol), (name, key, a["step"])
    assert b_rows[-1]["val_loss"] == pytest.approx(a_rows[-1]["val_loss"], rel=tol, abs=tol), name
    assert b_rows[-1]["val_rewards/margin"] == pytest.approx(a_rows[-1]["val_rewards/margin"], rel=tol, abs=tol), name


def _reward_sets(tmp, *extra):
    return [s.replace("'dpo'", "'reward'") for s in _sets(tmp, *extra) if "dpo." not in s] + [
        "reward.center_coefficient=0.01", f"data.sources=['{tmp / 'margins.jsonl'}']", f"data.dir='{tmp / 'rcorpus'}'"]


def test_dpo_and_reward_layouts_equal_one_process(tmp_path):
    """DPO at tp = 2, dp = 2, pp = 2 and the reward model (train.objective = "reward": the scalar head read at
    each response's last token, Bradley-Terry with the records' margins and the centring term) at tp = 2 with
    sequence parallelism (a row's score comes from the rank holding its last token) and pp = 2 equal one
    process; the reward model's first loss equals the formula written out in the test. One launch."""
    write_pairs(tmp_path / "pairs.jsonl", 40)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        if i % 3:
            r["margin"] = 0.1 * (i % 4)
    (tmp_path / "margins.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    single = tmp_path / "single"
    train_config(_sets(tmp_path), single)
    dpo = read_metrics(single)
    # the policy starts as the reference: the first loss is log 2, then the policy moves away from it
    assert dpo[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert dpo[-1]["rewards/margin"] > 0 and dpo[-1]["loss"] < np.log(2)
    pre = tmp_path / "precomputed"
    train_config(_sets(tmp_path, "dpo.precompute_reference=true"), pre)
    assert (pre / "reference_logps.pt").is_file()
    _same(dpo, read_metrics(pre), 1e-6, "precomputed")
    reward_single = tmp_path / "reward-single"
    train_config(_reward_sets(tmp_path), reward_single)
    reward = read_metrics(reward_single)
    assert reward[0]["loss"] == pytest.approx(_first_reward_loss(_reward_sets(tmp_path), reward_single), rel=1e-5)

    dpo_layouts = {"tp2": ["parallel.tp=2"], "dp2": ["parallel.dp=2"], "pp2": ["parallel.pp=2"]}
    reward_layouts = {"reward-tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
                      "reward-pp2": ["parallel.pp=2"]}
    runs = [(_sets(tmp_path, *extra), tmp_path / name) for name, extra in dpo_layouts.items()]
    runs += [(_reward_sets(tmp_path, *extra), tmp_path / name) for name, extra in reward_layouts.items()]
    run_workers(train_configs, 2, runs, timeout=300)
    for name in dpo_layouts:
        _same(dpo, read_metrics(tmp_path / name), 1e-5, name)
    for name in reward_layouts:
        ours = read_metrics(tmp_path / name)
        assert [r["step"] for r in ours] == [1, 2, 3], name
        for a, b in zip(reward, ours):
            for key in ("loss", "grad_norm", "accuracy", "margin"):
                # three updates at lr 1e-2 carry the rounding of another reduction order (the scores summed
                # over tp under sequence parallelism) to ~3e-5 by step 3; a wrong score or margin moves percents
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), (name, key, a["step"])
        assert ours[-1]["val_accuracy"] == pytest.approx(reward[-1]["val_accuracy"], abs=1e-6), name


def test_preference_records_become_adjacent_pairs(tmp_path):
    from megaloom.data.sft import prepare_sft_corpus
    from megaloom.data.sft_loader import SFTBatchLoader, SFTDataset

    info = prepare_sft_corpus([str(write_pairs(tmp_path / "p.jsonl", 12))], tmp_path / "c", vocab_size=300,
                              val_fraction=0.2)
    assert info.group == 2 and info.train_docs % 2 == 0 and info.val_docs % 2 == 0
    data = SFTDataset(info.directory, "train")
    x, y, ids = SFTBatchLoader(data, 32, 2, seed=0).next_batch()
    assert x.shape == (4, 32) and ids[0] == ids[1] and ids[2] == ids[3]
    # a pair's two rows share the prompt and differ in the scored response
    first = int((y[0] != -100).nonzero()[0])
    assert torch.equal(x[0, :first], x[1, :first]) and not torch.equal(y[0], y[1])
    with open(tmp_path / "mixed.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
        f.write(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(Exception, match="mixed"):
        prepare_sft_corpus([str(tmp_path / "mixed.jsonl")], tmp_path / "c2", vocab_size=300)


def _first_reward_loss(sets, run_dir):
    """The first step's loss written out: the model at its initialisation, the score head from the seed as the
    objective documents it, each row's hidden state at the token after its last scored target, and
    -log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2 averaged over the step's two micro-batches."""
    import math

    from megaloom.data.sft_loader import SFTBatchLoader, SFTDataset
    from megaloom.model import build_model

    cfg = load_config("configs/debug.toml", sets)
    corpus = ensure_corpus_for(cfg, run_dir.parent / "cache")
    x, y, ids = SFTBatchLoader(SFTDataset(corpus.directory, "train"), cfg.model.seq_len, 4, seed=cfg.train.seed).next_batch()
    model = build_model(cfg.model, cfg.train.seed, torch.device("cpu"))
    w = torch.randn(1, cfg.model.hidden, generator=torch.Generator().manual_seed(cfg.train.seed + 7919))
    w = w / math.sqrt(cfg.model.hidden + 1)
    margins = torch.from_numpy(np.load(corpus.directory / "train.margin.npy"))
    with torch.no_grad():
        h = model.hidden_states(x)
    scores = []
    for r in range(len(x)):
        last = int((y[r] != -100).nonzero().max())
        scores.append(float(h[r, min(last + 1, x.shape[1] - 1)] @ w[0]))
    losses = []
    for half in (range(0, 4), range(4, 8)):  # micro-batches of two pairs
        terms = []
        for r in list(half)[0::2]:
            m = float(margins[ids[r]])
            d = scores[r] - scores[r + 1] - m
            terms.append(math.log1p(math.exp(-d)) + 0.01 * (scores[r] + scores[r + 1]) ** 2)
        losses.append(sum(terms) / len(terms))
    return sum(losses) / 2
