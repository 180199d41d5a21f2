"""Quantization-aware training on single layers and configs: megaloom's fake-quantized linear equals
torchao's own QAT module (`quantize_(..., QATConfig(base_config, step="prepare"))`, or for int8-weight,
which torchao 0.18 cannot infer, FakeQuantizedLinear with the same config) in output and gradients, and
its fake-quantized weight equals, bit for bit, the dequantised weight of torchao's post-training
quantization with the scheme's config (what `--from-qat` writes); bad [qat] settings are one line."""

from __future__ import annotations

import warnings

import pytest
import torch

from megaloom.compress.qat import FakeQuantLinear, prepare, qat_scheme
from megaloom.compress.schemes import QuantScheme
from megaloom.config import load_config
from megaloom.errors import ConfigError

warnings.filterwarnings("ignore", message=".*register_constant.*")

SCHEMES = [("int4-weight", 16), ("int8-dynamic-act-int4-weight", 16), ("int8-weight", None), ("int8-weight", 16)]


def _layer(bias: bool):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
        lin.weight[3, 5] = 0.9  # an outlier sets its group's and row's scale
        if bias:
            lin.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(3, 7, 64, generator=g) * 2.0
    x[0, 2] += 5.0  # a token with a large range
    return lin, x


def _torchao_qat(lin: torch.nn.Linear, scheme: QuantScheme) -> torch.nn.Module:
    """torchao's own prepared module for the scheme, on a copy of `lin`."""
    import copy

    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    ref = torch.nn.Sequential(copy.deepcopy(lin))
    if scheme.method.value == "int8-weight":  # no QATConfig(Int8WeightOnlyConfig) in torchao 0.18
        act, weight = scheme.fake_quantize_configs()
        return FakeQuantizedLinear.from_linear(ref[0], act, weight)
    quantize_(ref, QATConfig(scheme.torchao_config(), step="prepare"))
    assert isinstance(ref[0], FakeQuantizedLinear)
    return ref[0]


@pytest.mark.parametrize("method,group", SCHEMES)
@pytest.mark.parametrize("bias", [False, True])
def test_fake_quant_equals_torchao_qat(method, group, bias):
    scheme = QuantScheme.parse(method, group)
    lin, x = _layer(bias)
    ref = _torchao_qat(lin, scheme)
    mine = FakeQuantLinear(lin, scheme, row_parallel=False, tp=None)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), mine(x2)
    assert torch.equal(y, y_ref), f"{method}: output differs from torchao's QAT module"
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    assert torch.equal(x2.grad, x1.grad)
    assert torch.equal(mine.weight.grad, ref.weight.grad)
    # the fake quantization changes the output (a broken no-op would not), within the scheme's rounding
    plain = lin(x)
    assert 0 < (y - plain).abs().max() < 0.5 * plain.abs().max()


@pytest.mark.parametrize("method,group", SCHEMES)
def test_fake_quant_weight_is_torchao_quantized_weight(method, group):
    """The weight the forward uses is exactly the dequantised weight `megaloom quantize` (torchao's
    quantize_ with the scheme's config) makes: same scales, same zero points, same rounding."""
    import copy

    from torchao.quantization import quantize_

    scheme = QuantScheme.parse(method, group)
    lin, x = _layer(False)
    mine = FakeQuantLinear(lin, scheme, row_parallel=False, tp=None)
    q = torch.nn.Sequential(copy.deepcopy(lin))
    quantize_(q, scheme.torchao_config())
    assert torch.equal(mine.weight_fake_quantizer(mine.weight), q[0].weight.dequantize())
    # and the quantized layer computes the fake-quantized forward (int8's kernel scales after the GEMM)
    torch.testing.assert_close(q(x), mine(x), rtol=0, atol=1e-4)


def test_prepare_keeps_names_and_counts():
    from megaloom.model.transformer import Transformer

    cfg = load_config("configs/debug.toml", ["qat.scheme='int4-weight'", "qat.group_size=16"])
    model = Transformer(cfg.model)
    before = {n: p for n, p in model.named_parameters()}
    assert prepare(model, qat_scheme(cfg), None) == 4 * cfg.model.layers
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert isinstance(model.layers["0"].mlp.down, FakeQuantLinear)


def test_default_group_sizes():
    assert qat_scheme(load_config("configs/debug.toml", ["qat.scheme='int4-weight'"])).group_size == 32
    assert qat_scheme(load_config("configs/debug.toml", ["qat.scheme='int8-weight'"])).group_size is None


@pytest.mark.parametrize("sets,message", [
    (["qat.scheme='int3-weight'"], r"^qat\.scheme = 'int3-weight' is not one of none \| int8-dynamic-act-int4-weight"),
    (["qat.scheme='int4-weight'", "qat.group_size=48"],
     r"^qat\.group_size = 48 does not divide attn\.qkv's 64 input features .*divides 64, e\.g\. 32$"),
    (["qat.scheme='int4-weight'", "qat.group_size=64", "parallel.tp=2"],
     r"^qat\.group_size = 64 does not divide each of the parallel\.tp = 2 ranks' 32 of attn\.proj's 64 input"),
    (["qat.scheme='int8-weight'", "qat.group_size=-4"], r"^qat\.group_size = -4 must be 0 .*or at least 2"),
    (["qat.group_size=32"], r"^qat\.group_size = 32 needs a qat\.scheme"),
    (["qat.scheme='int4-weight'", "peft.method='dora'"], r"composes with full training and peft\.method = \"lora\""),
])
def test_config_errors_are_one_line(sets, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("configs/debug.toml", sets)
    assert "\n" not in str(e.value)
