import pytest
import torch

from megaloom.config import ModelConfig, TrainConfig
from megaloom.model import Transformer, build_model, count_parameters, init_model
from megaloom.model.init import full_tensor
from megaloom.perf import flops
from megaloom.train.optim import build_optimizer
from megaloom.train.step import train_step

FAMILIES = {
    "gpt2": dict(family="gpt2", layers=2, hidden=64, heads=4, vocab_size=97, seq_len=32),
    "llama": dict(family="llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab_size=97, seq_len=32),
}


@pytest.fixture(params=list(FAMILIES))
def cfg(request) -> ModelConfig:
    return ModelConfig(**FAMILIES[request.param])


def test_family_structure():
    g = build_model(ModelConfig(**FAMILIES["gpt2"]), 0)
    assert isinstance(g.layers["0"].attn_norm, torch.nn.LayerNorm) and g.embed.pos is not None and g.head.weight is None
    assert g.layers["0"].attn.qkv.bias is not None
    l = build_model(ModelConfig(**FAMILIES["llama"]), 0)
    assert isinstance(l.layers["0"].attn_norm, torch.nn.RMSNorm) and l.embed.pos is None and l.head.weight is not None
    assert l.layers["0"].attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 64)  # GQA: 4 q heads, 2 kv heads
    assert l.layers["0"].mlp.up.weight.shape[0] == 2 * l.cfg.ffn  # fused [gate; up]


def test_init_is_deterministic_and_seed_dependent(cfg):
    a, b, c = build_model(cfg, 7), build_model(cfg, 7), build_model(cfg, 8)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if pa.std() > 0:
            assert not torch.equal(pa, pc), n


def test_init_depends_only_on_names_not_on_layout(cfg):
    """A model slice (e.g. a pipeline stage holding layer 1 only) gets exactly the full model's values."""
    full = build_model(cfg, 3)
    part = Transformer(cfg)
    del part.layers["0"]
    init_model(part, 3)
    for name, p in part.named_parameters():
        assert torch.equal(p, dict(full.named_parameters())[name]), name


def test_fused_blocks_are_drawn_independently(cfg):
    """A row shard of each qkv block equals the same rows of the full tensor (what tp will rely on)."""
    name = "layers.0.attn.qkv.weight"
    full = full_tensor(cfg, name, (cfg.hidden + 2 * cfg.n_kv_heads * cfg.head_dim, cfg.hidden), 5)
    q = full[: cfg.hidden]
    # the q block is independent of the k/v widths: same values with a different kv_heads
    other = ModelConfig(**{**FAMILIES["llama"], "kv_heads": 1})
    full2 = full_tensor(other, name, (cfg.hidden + 2 * other.n_kv_heads * other.head_dim, cfg.hidden), 5)
    assert torch.equal(q, full2[: cfg.hidden])


def test_residual_projection_init_is_scaled(cfg):
    m = build_model(ModelConfig(**{**FAMILIES["gpt2"], "layers": 8, "hidden": 256, "heads": 4}), 0)
    std = m.layers["0"].attn.proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert torch.all(m.layers["0"].attn_norm.weight == 1) and torch.all(m.layers["0"].attn.qkv.bias == 0)


def test_parameter_count_matches_formulas(cfg):
    assert count_parameters(cfg) == flops.parameters(cfg) == sum(p.numel() for p in build_model(cfg, 0).parameters())


def test_paper_parameter_formula_gpt2():
    cfg = ModelConfig(layers=24, hidden=2048, heads=16, vocab_size=50304, seq_len=2048)
    paper = flops.paper_parameters(24, 2048, 50304, 2048)
    assert count_parameters(cfg) - round(paper) == 2 * 2048  # the final LayerNorm


def test_causality(cfg):
    """Changing a future token must not change earlier logits."""
    m = build_model(cfg, 0).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % cfg.vocab_size
    torch.testing.assert_close(m(x)[:, :10], m(y)[:, :10], rtol=1e-5, atol=1e-6)


def test_overfits_a_fixed_batch(cfg):
    torch.manual_seed(0)
    m = build_model(cfg, 0)
    opt = build_optimizer(m, TrainConfig(lr=3e-3, weight_decay=0.0))
    x = torch.randint(0, cfg.vocab_size, (4, 33))
    batch = [(x[:, :-1], x[:, 1:])]
    first = train_step(m, opt, batch).loss.item()
    for _ in range(150):
        last = train_step(m, opt, batch).loss.item()
    assert first > 4.0 and last < 0.05, (first, last)


def test_sequence_longer_than_context_is_refused(cfg):
    m = build_model(cfg, 0)
    with pytest.raises(ValueError, match="exceeds model.seq_len"):
        m(torch.zeros(1, cfg.seq_len + 1, dtype=torch.long))
