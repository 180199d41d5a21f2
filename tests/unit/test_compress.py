"""Post-training compression on single layers: GPTQ against torchao's round to nearest, SparseGPT and
Wanda against magnitude pruning, Wanda's mask against an independent per-row top-k, N:M patterns,
int4 packing. Random layers whose inputs are correlated (as a transformer's are), where the
calibration-aware methods must lower the layer's output error, which a broken update would not."""

from __future__ import annotations

import warnings

import pytest
import torch

from megaloom.compress.gptq import gptq, int4_tensor, inverse_cholesky
from megaloom.compress.hessian import Grams
from megaloom.compress.prune import Sparsity, _lowest, magnitude_mask, sparsegpt, wanda_mask
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


# ------------------------------------------------ the vectorised loops against Algorithm 1 written plainly


def gptq_by_columns(w: torch.Tensor, h: torch.Tensor, group: int, damp: float = 0.01):  # noqa: ANN201
    """GPTQ (Frantar et al. 2022, Algorithm 1 without lazy batches): column by column, torchao's own
    quantize_affine / dequantize_affine on each column, every later column updated at once."""
    from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine

    from megaloom.compress.gptq import int4_qparams

    work = w.clone().double()
    u = inverse_cholesky(h, work, damp)
    q = torch.empty(w.shape, dtype=torch.int8)
    scales, zeros = [], []
    for c in range(w.shape[1]):
        if c % group == 0:
            scale, zero = int4_qparams(work[:, c:c + group].float())
            scales.append(scale)
            zeros.append(zero)
        qc = quantize_affine(work[:, c:c + 1].float(), (1, 1), scale, zero, torch.int8, -8, 7)
        q[:, c] = qc[:, 0]
        deq = dequantize_affine(qc, (1, 1), scale, zero, torch.int8, -8, 7, output_dtype=torch.float32).double()
        e = (work[:, c] - deq[:, 0]) / u[c, c]
        work[:, c:] -= e[:, None] * u[c, c:][None, :]
    return q, torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def sparsegpt_by_columns(w: torch.Tensor, h: torch.Tensor, sp: Sparsity, block: int, damp: float = 0.01):  # noqa: ANN201
    """SparseGPT (Algorithm 1) without lazy batches: the mask of each block of `block` columns (or of
    each M columns) chosen when it comes up, every pruned weight's error spread over all later columns."""
    work = w.clone().double()
    u = inverse_cholesky(h, work, damp)
    keep = torch.ones(w.shape, dtype=torch.bool)
    d = u.diagonal()
    for c in range(w.shape[1]):
        if not sp.structured and c % block == 0:
            score = work[:, c:c + block] ** 2 / d[None, c:c + block] ** 2
            order = torch.sort(score.flatten(), stable=True).indices[:int(score.numel() * sp.fraction)]
            flat = torch.ones(score.numel(), dtype=torch.bool)
            flat[order] = False
            keep[:, c:c + block] = flat.view(score.shape)
        if sp.structured and c % sp.m == 0:
            score = work[:, c:c + sp.m] ** 2 / d[None, c:c + sp.m] ** 2
            drop = torch.sort(score, dim=1, stable=True).indices[:, :sp.n]
            keep[:, c:c + sp.m] = torch.ones_like(score, dtype=torch.bool).scatter(1, drop, False)
        e = work[:, c] * (~keep[:, c]) / u[c, c]
        work[:, c:] -= e[:, None] * u[c, c:][None, :]
    return (work * keep).float(), keep


def test_gptq_equals_algorithm_1_column_by_column():
    w, x = correlated_layer(rows=40, cols=96)
    h = x.double().T @ x.double()
    q, s, z = gptq(w, h, group_size=32, block=64)  # a group that starts in one block and a last short block
    rq, rs, rz = gptq_by_columns(w, h, 32)
    assert torch.equal(q, rq) and torch.equal(z, rz)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)  # lazy updates change the float64 sums' rounding only


@pytest.mark.parametrize("spec", [(0.5, None), (None, "2:4")])
def test_sparsegpt_equals_algorithm_1_column_by_column(spec):
    w, x = correlated_layer(rows=40, cols=96)
    h = x.double().T @ x.double()
    sp = Sparsity.parse(*spec)
    got, keep = sparsegpt(w, h, sp, block=32)
    ref, ref_keep = sparsegpt_by_columns(w, h, sp, block=32)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_lowest_is_a_stable_sort_on_ties():
    score = torch.randint(0, 4, (7, 40)).double()  # many ties: the first in index order go first
    for k in (0, 1, 13, 40):
        expected = torch.ones_like(score, dtype=torch.bool)
        expected.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], False)
        assert torch.equal(_lowest(score, k), expected), k


def test_wanda_reads_the_gram_matrix_or_its_diagonal_alike():
    w, x = correlated_layer(rows=24, cols=64)
    grams = Grams({"lin": torch.nn.Identity()}, diagonal=True)
    grams.handles[0].remove()
    grams._hook("lin")(None, (x,))
    full = x.double().T @ x.double()
    torch.testing.assert_close(grams.h["lin"], full.diagonal(), rtol=1e-12, atol=0)
    for spec in ((0.5, None), (None, "2:4")):
        sp = Sparsity.parse(*spec)
        assert torch.equal(wanda_mask(w, grams.h["lin"], sp), wanda_mask(w, full, sp))
