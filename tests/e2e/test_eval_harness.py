"""megaloom eval equals lm-evaluation-harness (lm_eval 0.4.13, installed from PyPI) on the same tiny
random model and the same local task files: perplexity figures to 0.1% (they agree to ~1e-7), acc and
acc_norm item by item, with 2-shot contexts long enough to be cut from the left. The Llama case (a
tokenizer that adds BOS, GQA, untied head) runs by default, GPT-2 with the slow tests;
`python -m tools.eval_parity` prints the same comparison (docs/eval.md)."""

import pytest

from tests.tiny_eval import make_tiny_hf, write_task_files
from tools.eval_parity import compare, harness, megaloom

pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_megaloom_eval_equals_lm_eval(tmp_path, family):
    files = write_task_files(tmp_path / "data", n_choice=16)
    model_dir = make_tiny_hf(tmp_path / family, family)
    theirs, ours = harness(model_dir, files["tasks"], fewshot=2), megaloom(model_dir, files, fewshot=2)
    c = compare(theirs, ours)
    assert max(c["rel"].values()) < 1e-3, c["rel"]
    assert c["tokens_equal"], (ours["doc_tokens"], theirs["doc_tokens"])
    assert c["acc_items_equal"] == c["acc_norm_items_equal"] == c["items"] == 16
    assert ours["acc"] == theirs["acc"] and ours["acc_norm"] == theirs["acc_norm"]
    assert c["choice_ll_abs"] < 1e-3
