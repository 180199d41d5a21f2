"""GRPO's data: prompt records prepared with the generation prompt and kept whole for the reward; the
exact_match reward; the prompt loader's order (a pure function of seed and epoch, split over dp ranks)."""

import json

import pytest

from megaloom.align.grpo import PromptLoader, exact_match, last_number, load_reward
from megaloom.config import ConfigError
from megaloom.data.sft import prepare_sft_corpus
from megaloom.data.sft_loader import SFTDataset
from megaloom.data.sources import DataError
from megaloom.data.tokenizer import load_tokenizer


def test_prompts_are_rendered_with_the_generation_prompt_and_kept(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                           for i in range(20)))
    info = prepare_sft_corpus([str(src)], tmp_path / "c", vocab_size=300, val_fraction=0.2)
    assert info.prompts and info.group == 1
    data = SFTDataset(info.directory, "train")
    records = [json.loads(line) for line in (info.directory / "train.records.jsonl").read_text().splitlines()]
    assert len(records) == len(data) == info.train_docs
    tok = load_tokenizer(info.tokenizer_dir)
    start, end = data.bounds[0]
    text = tok.decode([int(t) for t in data.tokens[start:end]])
    assert records[0]["prompt"] in text and text.rstrip().endswith("<|assistant|>")  # the default template opens the turn
    assert not data.mask[start:end].any()  # nothing to score before a completion exists


def test_exact_match_and_reward_loading():
    assert exact_match(" 42.\n", {"answer": 42}) == 1.0
    assert exact_match("42 apples", {"answer": "42"}) == 0.0
    assert last_number("17 - 13 = 4", {"answer": "4"}) == 1.0 and last_number("17 - 13 = 1", {"answer": 4}) == 0.0
    assert last_number("3 - 5 = -2.", {"answer": "-2"}) == 1.0 and last_number("none", {"answer": "1"}) == 0.0
    with pytest.raises(DataError, match="rl.answer_field"):
        exact_match("1", {"solution": "1"})
    assert load_reward("tests.unit.test_rl_data:_half", "answer")("x", {}) == 0.5
    with pytest.raises(ConfigError, match="rl.reward"):
        load_reward("tests.unit.test_rl_data:missing", "answer")


def _half(completion, record):
    return 0.5


def test_prompt_loader_order_is_layout_independent():
    whole = PromptLoader(10, 4, seed=3)
    halves = [PromptLoader(10, 4, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):  # across an epoch boundary (10 prompts, 4 per step: 2 steps per epoch)
        ids, epoch = whole.next_batch()
        parts = [h.next_batch() for h in halves]
        assert ids.tolist() == parts[0][0].tolist() + parts[1][0].tolist()
        assert epoch.tolist() == parts[0][1].tolist() + parts[1][1].tolist()
    state = whole.state_dict()
    again = PromptLoader(10, 4, seed=3)
    again.load_state_dict(state)
    assert again.next_batch()[0].tolist() == whole.next_batch()[0].tolist()


def test_prompt_loader_minibatch_k_is_the_same_prompts_in_every_layout():
    """PPO's rollout of 8 prompts in mini-batches of 4: at dp = 2 rank r holds, of each mini-batch, its half."""
    whole = PromptLoader(20, 8, seed=3, minibatch=4)
    halves = [PromptLoader(20, 8, seed=3, dp_rank=r, dp_size=2, minibatch=4) for r in range(2)]
    assert halves[1].shares() == [(0, 2, 2), (2, 2, 6)]  # (first, count, position in the whole batch)
    for _ in range(3):  # across an epoch boundary
        ids = whole.next_batch()[0].tolist()
        parts = [h.next_batch()[0].tolist() for h in halves]
        for k in range(2):
            assert ids[4 * k:4 * k + 4] == parts[0][2 * k:2 * k + 2] + parts[1][2 * k:2 * k + 2]


def test_plot_draws_a_metric_and_names_the_fields_it_lacks(tmp_path):
    from megaloom.errors import ConfigError
    from megaloom.observe.plots import plot_loss

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 0.0, "reward": 0.1 * s} for s in (1, 2)] + [{"step": 3, "loss": 0.0, "val_reward": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_loss([run], tmp_path / "reward.png", "reward").stat().st_size > 0
    with pytest.raises(ConfigError, match="--metric kl: .* loss, reward, step, val_reward"):
        plot_loss([run], tmp_path / "kl.png", "kl")
