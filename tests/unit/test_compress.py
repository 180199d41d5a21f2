"""Post-training compression on single layers: GPTQ against torchao's round to nearest, SparseGPT and
Wanda against magnitude pruning, Wanda's mask against an independent per-row top-k, N:M patterns,
int4 packing. Random layers whose inputs are correlated (as a transformer's are), where the
calibration-aware methods must lower the layer's output error, which a broken update would not."""

from __future__ import annotations

import warnings

import pytest
import torch

from megaloom.compress.gptq import gptq, int4_tensor
from megaloom.compress.prune import Sparsity, magnitude_mask, sparsegpt, wanda_mask
from megaloom.compress.schemes import QuantScheme
from megaloom.compress.store import pack_int4, unpack_int4
from megaloom.errors import ConfigError

warnings.filterwarnings("ignore", message=".*register_constant.*")


def correlated_layer(rows: int = 48, cols: int = 128, tokens: int = 2048, seed: int = 0):
    """W (rows, cols) and inputs X (tokens, cols) with strongly correlated features and a few large ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) / cols ** 0.5
    mix = torch.randn(cols, cols, generator=g) * torch.linspace(0.3, 1.0, cols)  # uneven, correlated
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, ::16] *= 6.0  # outlier features, as LLM activations have
    return w, x


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x.double() @ (w.double() - w_hat.double()).T) ** 2).sum())


def rtn_int4(w: torch.Tensor, group: int):  # noqa: ANN201
    """torchao's own int4 round to nearest of an nn.Linear with weight `w`."""
    from torchao.quantization import quantize_

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    quantize_(lin, QuantScheme.parse("int4-weight", group).torchao_config())
    return lin.weight


def test_gptq_with_identity_hessian_is_torchao_round_to_nearest():
    w, _ = correlated_layer()
    q, s, z = gptq(w, torch.eye(w.shape[1], dtype=torch.float64) * 3.0, group_size=32)
    ref = rtn_int4(w, 32)
    assert torch.equal(q, ref.qdata) and torch.equal(s, ref.scale) and torch.equal(z, ref.zero_point)
    assert torch.equal(int4_tensor(q, s, z, 32).dequantize(), ref.dequantize())


def test_gptq_lowers_the_output_error_of_round_to_nearest():
    w, x = correlated_layer()
    h = x.double().T @ x.double()
    q, s, z = gptq(w, h, group_size=32, block=32)  # blocks smaller than the matrix: the lazy updates matter
    err_gptq = output_error(w, int4_tensor(q, s, z, 32).dequantize(), x)
    err_rtn = output_error(w, rtn_int4(w, 32).dequantize(), x)
    assert q.min() >= -8 and q.max() <= 7
    assert err_gptq < 0.75 * err_rtn, (err_gptq, err_rtn)


@pytest.mark.parametrize("spec", [(0.5, None), (None, "2:4")])
def test_sparsegpt_and_wanda_beat_magnitude(spec):
    w, x = correlated_layer()
    h = x.double().T @ x.double()
    sp = Sparsity.parse(*spec)
    w_mag = w * magnitude_mask(w, sp)
    w_wanda = w * wanda_mask(w, h, sp)
    w_sgpt, keep = sparsegpt(w, h, sp, block=32)
    errs = {k: output_error(w, v, x) for k, v in (("magnitude", w_mag), ("wanda", w_wanda), ("sparsegpt", w_sgpt))}
    assert torch.equal(w_sgpt == 0, ~keep | (w == 0))
    for v in (w_mag, w_wanda, w_sgpt):
        assert int((v == 0).sum()) == w.numel() // 2
    assert errs["sparsegpt"] < 0.8 * errs["magnitude"] and errs["wanda"] < 0.9 * errs["magnitude"], errs
    assert errs["sparsegpt"] < 0.8 * output_error(w, w * keep, x), errs  # its update, not only its mask, helps


def test_wanda_mask_is_a_per_row_top_k_of_weight_times_input_norm():
    w, x = correlated_layer(rows=24, cols=64)
    score = w.abs() * torch.linalg.vector_norm(x, dim=0)  # |W_ij| * ||X_j||_2, straight from the inputs
    k = int(0.6 * w.shape[1])
    expected = torch.zeros_like(w, dtype=torch.bool)
    expected.scatter_(1, torch.topk(score, w.shape[1] - k, dim=1).indices, True)  # the kept: the largest
    got = wanda_mask(w, x.double().T @ x.double(), Sparsity.parse(0.6, None))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_n_of_m_pattern_is_exact(method):
    w, x = correlated_layer(rows=16, cols=64)
    h = x.double().T @ x.double()
    sp = Sparsity.parse(None, "3:8")
    if method == "magnitude":
        out = w * magnitude_mask(w, sp)
    elif method == "wanda":
        out = w * wanda_mask(w, h, sp)
    else:
        out = sparsegpt(w, h, sp, block=32)[0]
    zeros = (out == 0).reshape(16, 8, 8).sum(dim=-1)
    assert torch.equal(zeros, torch.full_like(zeros, 3))


def test_int4_packing_round_trips():
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 5)
    assert torch.equal(unpack_int4(packed), q)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="--pattern 4:4"):
        Sparsity.parse(None, "4:4")
    with pytest.raises(ConfigError, match="one of --sparsity"):
        Sparsity.parse(0.5, "2:4")
    with pytest.raises(ConfigError, match="each rank's 48 of its 96 input features at tp = 2"):
        QuantScheme.parse("int4-weight", 32).check_width("layers.0.mlp.down.weight", 96, tp=2, row_parallel=True)
    with pytest.raises(ConfigError, match="--method 'int3'"):
        QuantScheme.parse("int3")
