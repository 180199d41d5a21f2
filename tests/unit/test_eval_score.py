"""Scoring on one process: per-token losses equal F.cross_entropy's, each request's log-likelihood equals
a plain log_softmax of the model's logits, and neither the batch size nor the padding changes a score."""

import random

import pytest
import torch
import torch.nn.functional as F

from megaloom.config import load_config
from megaloom.eval.generate import Sampling, generate_parallel
from megaloom.eval.requests import rolling_token_windows
from megaloom.eval.score import Scorer
from megaloom.model import build_model, generate
from megaloom.parallel.grid import ProcessGrid
from megaloom.train.assemble import ParallelModel

V = 64


def _model(family):
    cfg = load_config(None, [f'model.family="{family}"', "model.layers=2", "model.hidden=32", "model.heads=4",
                             f"model.vocab_size={V}", "model.seq_len=32", f"data.vocab_size={V}", "model.init_std=0.2"])
    return build_model(cfg.model, 1).eval(), cfg


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_token_loss_equals_cross_entropy(family):
    model, _ = _model(family)
    x = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
    y[0, :5] = -100
    with torch.no_grad():
        per_token = model(x, y, reduction="none")
        expected = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")
        torch.testing.assert_close(per_token, expected, rtol=1e-5, atol=1e-5)
        assert (per_token[0, :5] == 0).all()
        torch.testing.assert_close(per_token.sum() / (y != -100).sum(), model(x, y), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="no gradient"):
        model(x, y, reduction="none")


def _requests(n_docs=12, max_length=16):
    rng = random.Random(0)
    out = []
    for _ in range(n_docs):
        tokens = [rng.randrange(V) for _ in range(rng.randrange(1, 60))]
        out += rolling_token_windows(tokens, V - 1, max_length)
    return out


def test_scores_equal_log_softmax_and_do_not_depend_on_the_batch():
    model, cfg = _model("llama")
    scorer = Scorer(model, None, ProcessGrid(1, 1, 1), torch.device("cpu"), cfg.model.seq_len)
    requests = _requests()
    one = scorer.loglikelihoods(requests, 16, batch_size=1)
    sixteen = scorer.loglikelihoods(requests, 16, batch_size=16)
    reference = []
    with torch.no_grad():
        for r in requests:
            whole = list(r.context + r.continuation)[-17:]
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).double(), -1)[0]
            n = len(r.continuation)
            reference.append(logp[-n:].gather(-1, torch.tensor(whole[-n:])[:, None]).sum().item())
    assert one == pytest.approx(reference, rel=1e-5, abs=1e-5)
    assert sixteen == pytest.approx(one, rel=1e-6, abs=1e-5)  # float rounding of other GEMM shapes only
    assert model.training is False


def test_generate_parallel_on_one_process_is_generate():
    model, cfg = _model("gpt2")
    pm = ParallelModel(model, None, None, None)
    prompt = [3, 1, 4, 1, 5]
    s = Sampling(max_new_tokens=12, temperature=0.9, top_k=20, seed=7)
    rows = generate_parallel(pm, ProcessGrid(1, 1, 1), prompt, 2, s, torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    expected = generate(model, torch.tensor([prompt] * 2), 12, temperature=0.9, top_k=20, generator=gen)
    assert rows == expected.tolist()
