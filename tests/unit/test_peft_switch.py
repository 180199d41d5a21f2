"""`adapters_off` (megaloom/tune/peft.py): inside it a model with adapters computes exactly its frozen base, for
every method that has a switch (LoRA, DoRA, (IA)^3, Houlsby adapters), and after it the adapters act again;
prefix and prompt tuning have no switch and say so. The reference of DPO, GRPO and PPO under PEFT is built on
it (tests/distributed/test_align_peft.py)."""

import pytest
import torch

from megaloom.config import load_config
from megaloom.model import build_model
from megaloom.tune.peft import PeftHook, adapters_off, apply_peft

SETS = ["model.family='llama'", "model.layers=2", "model.hidden=32", "model.heads=4", "model.vocab_size=64",
        "data.vocab_size=64", "model.seq_len=16", "peft.targets=['q_proj','v_proj','o_proj','up_proj','down_proj']"]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adapter"])
def test_adapters_off_is_the_base(method):
    cfg = load_config("configs/debug.toml", [*SETS, f"peft.method='{method}'", "peft.bottleneck=8"])
    base = build_model(cfg.model, cfg.train.seed, torch.device("cpu"))
    model = build_model(cfg.model, cfg.train.seed, torch.device("cpu"))
    apply_peft(model, cfg, None)
    PeftHook(cfg).loaded(model, fresh=True)  # DoRA's magnitudes from the base
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters that change the output (LoRA's B and the adapters' up start at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randint(0, 64, (2, 16), generator=gen)
    with torch.no_grad():
        want, adapted = base(x), model(x)
        assert (adapted - want).abs().max() > 1e-2, method  # the adapters act
        with PeftHook(cfg).off(model):
            off = model(x)
        again = model(x)
    assert torch.equal(off, want), method
    assert torch.equal(again, adapted), method


def test_prompt_tuning_has_no_switch():
    cfg = load_config("configs/debug.toml", [*SETS[:-1], "peft.method='prompt'", "peft.virtual_tokens=4"])
    model = build_model(cfg.model, cfg.train.seed, torch.device("cpu"))
    apply_peft(model, cfg, None)
    assert not PeftHook(cfg).switchable
    with pytest.raises(ValueError, match="adapters_off"):
        with adapters_off(model):
            pass
    with pytest.raises(Exception, match="peft.reference"):
        load_config("configs/debug.toml", [*SETS[:-1], "peft.method='prefix'", "peft.reference='adapters_off'"])
