"""GPTQ (Frantar, Ashkboos, Hoefler and Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1), written here.

For one linear W (rows x cols) and H = X^T X of its calibration inputs, the columns are quantized in
order; the error of column j, divided by the j-th diagonal entry of the upper Cholesky factor U of
H^-1, is spread over the columns not yet quantized along row j of U (the optimal-brain-surgeon update
with the Cholesky reformulation of section 4, step 3). Updates inside a block of `block` columns are
applied at once to the rest of the matrix (lazy batch updates, step 2). `damp` times the mean of H's
diagonal is added to it (section 4, "numerical stability"); inputs that are always zero get H_jj = 1
and a zero weight. With groups, a group's scale is chosen from the group's weights as they are when
its first column comes up (already updated by the columns before it), as the paper's section 4
describes; no reordering of columns (act-order), so groups stay contiguous ranges of input features
and a tensor-parallel rank's share of them is whole.

The quantizer is torchao's (choose_qparams_affine and quantize_affine with the arguments
IntxUnpackedToInt8Tensor.from_hp uses), so the integers and scales go straight into torchao's int4
tensor; with H a multiple of the identity, GPTQ returns exactly torchao's round-to-nearest tensor.
"""

from __future__ import annotations

import torch


def inverse_cholesky(h: torch.Tensor, w: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) I)^-1, after the dead inputs are fixed up
    (H_jj = 1 and column j of `w` zeroed, in place). Float64 throughout."""
    h = h.clone().double()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def int4_qparams(w: torch.Tensor, bits_min: int = -8, bits_max: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale and zero point of each row of `w` (rows, g): torchao's choice for one group."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    return choose_qparams_affine(w, MappingType.SYMMETRIC, (1, w.shape[1]), target_dtype=torch.int8,
                                 quant_min=bits_min, quant_max=bits_max, zero_point_dtype=torch.int8, keepdim=True)


def gptq(w: torch.Tensor, h: torch.Tensor, group_size: int, damp: float = 0.01, block: int = 128,
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of `w` (rows, cols) to symmetric int4 with one scale per group of `group_size` columns.
    Returns (qdata int8 (rows, cols) in -8..7, scale (rows, cols/group), zero_point int8 (same)), the
    fields of torchao's IntxUnpackedToInt8Tensor with block size (1, group_size).

    Each block is worked on transposed (`wt`, block columns as contiguous rows), so that a column's
    rounding and its rank-1 update of the block's later columns are a few whole-tensor ops each."""
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"group size {group_size} does not divide the {cols} input features")
    dtype = w.dtype
    work = w.detach().clone().double()
    u = inverse_cholesky(h, work, damp)
    qt = torch.empty(cols, rows, dtype=torch.int8)
    scales, zeros = [], []
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wt = work[:, b0:b1].T.contiguous()  # (block, rows), updated in place, column by column
        err = torch.empty_like(wt)
        for j in range(b1 - b0):
            c = b0 + j
            if c % group_size == 0:  # the group's weights as updated so far (they may run past this block)
                current = torch.cat([wt[j:].T, work[:, b1:c + group_size]], dim=1)[:, :group_size]
                scale, zero = int4_qparams(current.to(dtype))
                scales.append(scale)
                zeros.append(zero)
                inv, zf, sc = 1.0 / scale[:, 0], zero[:, 0].to(dtype), scale[:, 0]
            # torchao's quantize_affine and dequantize_affine for one column, op for op (bit-identical)
            q = torch.clamp(torch.round(wt[j].to(dtype) * inv) + zf, -8, 7)
            qt[c] = q.to(torch.int8)
            e = (wt[j] - ((q - zf) * sc).double()) / u[c, c]
            wt[j:] -= u[c, c:b1][:, None] * e[None, :]
            err[j] = e
        work[:, b1:] -= err.T.contiguous() @ u[b0:b1, b1:]  # the block's lazy update of every later column
    return qt.T.contiguous(), torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def int4_tensor(qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                dtype: torch.dtype = torch.float32):  # noqa: ANN201 (torchao IntxUnpackedToInt8Tensor)
    """The torchao int4 weight of IntxWeightOnlyConfig(torch.int4, PerGroup(group_size)) from its fields."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    return IntxUnpackedToInt8Tensor(qdata, scale, zero, torch.int4, (1, group_size), dtype, None)
