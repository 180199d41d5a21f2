import pytest
import torch

from megaloom.config import ModelConfig
from megaloom.model import build_model, generate, sample_next

from .test_model import FAMILIES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_logits_equal_full_recompute(family):
    cfg = ModelConfig(**FAMILIES[family])
    m = build_model(cfg, 0).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    full = m(x)
    cache = m.new_cache(2)
    parts = [m(x[:, :7], cache=cache), m(x[:, 7:8], cache=cache), m(x[:, 8:15], cache=cache), m(x[:, 15:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9)])
def test_generation_with_cache_equals_without(family, sampling):
    cfg = ModelConfig(**FAMILIES[family])
    m = build_model(cfg, 1)
    prompt = torch.randint(0, cfg.vocab_size, (3, 5))
    a = generate(m, prompt, 20, generator=torch.Generator().manual_seed(4), **sampling)
    b = generate(m, prompt, 20, use_cache=False, generator=torch.Generator().manual_seed(4), **sampling)
    assert a.shape == (3, 25) and torch.equal(a, b)
    assert m.training  # generate restores the mode


def test_generation_stops_at_context():
    cfg = ModelConfig(**FAMILIES["gpt2"])
    out = generate(build_model(cfg, 0), torch.zeros(1, 30, dtype=torch.long), 100, temperature=0)
    assert out.shape[1] == cfg.seq_len


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)  # p0 = 0.64, p0+p1 = 0.88
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, 1.0, top_p=float(p[0] + 0.01), generator=g).tolist()) == {0, 1}
    assert sample_next(logits[:1], 0.0).item() == 0
