"""(IA)³, prefix and prompt tuning and Houlsby adapters on one process, beyond the PEFT parity of
tests/distributed/test_tune_methods_layouts.py: the Houlsby formula written out by hand, identity at start;
packed documents with virtual tokens equal each document alone; generation's KV cache (which starts with
the prefix, or gets the soft prompt on its first call) equals the uncached model; (IA)³ merged equals
unmerged; settings the virtual tokens cannot work with stop with one line."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from megaloom.config import load_config
from megaloom.errors import ConfigError
from megaloom.model import build_model
from megaloom.model.generate import generate
from megaloom.tune import adapter as houlsby

MODULE = {"ia3": "megaloom.tune.ia3", "prefix": "megaloom.tune.prompt", "prompt": "megaloom.tune.prompt",
          "adapter": "megaloom.tune.adapter"}
FAMILY = {"gpt2": ["model.family='gpt2'"], "llama-gqa": ["model.family='llama'", "model.kv_heads=2"]}


def _cfg(family, method, *extra):
    return load_config(None, [*FAMILY[family], "model.layers=2", "model.hidden=32", "model.heads=4",
                              "model.vocab_size=64", "data.vocab_size=64", "model.seq_len=24", "model.max_positions=32",
                              f"peft.method='{method}'", "peft.virtual_tokens=3", "peft.bottleneck=5", *extra])


def _tuned(cfg, noise=0.3):
    """The base model of cfg with the method applied and its parameters moved off their initial values."""
    model = build_model(cfg.model, cfg.train.seed)
    model.requires_grad_(False)
    importlib.import_module(MODULE[cfg.peft.method]).apply(model, cfg, None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn(p.shape, generator=gen))
    return model


def test_houlsby_adapters_are_the_written_out_formula_and_identity_at_start():
    cfg = _cfg("llama-gqa", "adapter")
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    base = build_model(cfg.model, cfg.train.seed)
    fresh = build_model(cfg.model, cfg.train.seed)
    houlsby.apply(fresh, cfg, None)
    assert sum(p.numel() for n, p in fresh.named_parameters() if "adapter" in n) == 2 * 2 * (2 * 32 * 5 + 5 + 32)
    torch.testing.assert_close(fresh(x), base(x), rtol=0, atol=0)  # up-projections zero: the base itself
    model = _tuned(cfg)
    h = model.embed(x)
    for block in model.layers.values():  # h + W_u gelu(W_d h + b_d) + b_u after each sublayer, by hand
        def a(v, m):
            return v + F.gelu(v @ m.down.weight.T + m.down.bias, approximate="tanh") @ m.up.weight.T + m.up.bias
        h = h + a(block.attn(block.attn_norm(h), model.rope), block.attn_adapter)
        h = h + a(block.mlp(block.mlp_norm(h)), block.mlp_adapter)
    torch.testing.assert_close(model(x), model.head(model.norm(h)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_packed_documents_with_virtual_tokens_equal_each_alone(family, method):
    cfg = _cfg(family, method)
    model = _tuned(cfg)
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 64, (n,), generator=g) for n in (7, 10, 8)]
    row = torch.cat(docs)[None, :-1]  # 24 inputs
    ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None, :-1]
    start = 0
    for tokens in docs:
        y = torch.full((1, 24), -100)
        y[0, start:start + len(tokens) - 1] = tokens[1:]
        packed = model(row, y, docs=ids)
        alone = model(tokens[None, :-1], tokens[None, 1:])
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        start += len(tokens)
    assert model(row, docs=ids).shape == (1, 24, 64)  # logits of the real tokens only


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_generation_with_the_cache_equals_without(family, method):
    model = _tuned(_cfg(family, method)).eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2)
    assert cache.length == (3 if method == "prefix" else 0)  # prefix tuning: the cache starts with the prefix
    with torch.no_grad():
        first = model(prompt, cache=cache)
        torch.testing.assert_close(first, model(prompt), rtol=1e-5, atol=1e-5)
        nxt = first[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, cache=cache)[:, -1]
        torch.testing.assert_close(step, model(torch.cat([prompt, nxt], 1))[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, prompt, 6, temperature=0), generate(model, prompt, 6, temperature=0,
                                                                           use_cache=False))


@pytest.mark.parametrize("targets", ["", "'q_proj', 'o_proj', 'gate_proj', 'down_proj'"])
@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_ia3_merged_equals_unmerged(family, targets):
    if family == "gpt2" and targets:
        targets = "'c_fc', 'c_proj'"  # attention's c_proj scales its output, the MLP's its input
    cfg = _cfg(family, "ia3", f"peft.targets=[{targets}]")
    model = _tuned(cfg)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(x)
        importlib.import_module(MODULE["ia3"]).merge(model)
        assert not any(p.requires_grad for p in model.parameters())
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sets,words", [
    (["model.max_positions=25"], "virtual_tokens = 3: .* position 26, past GPT-2's 25 learned .*seq_len = 22"),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], "peft.virtual_tokens = 3: sequence parallelism .* multiple of 2"),
    (["peft.prompt_init_text='hi'"], "prompt_init_text is read with model.pretrained's tokenizer"),
])
def test_settings_virtual_tokens_cannot_work_with_stop_with_one_line(sets, words):
    with pytest.raises(ConfigError, match=words):
        _cfg("gpt2", "prompt", *sets)
