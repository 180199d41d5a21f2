"""Quantization-aware training ([qat]): the block linears of the trained model fake-quantized in every
forward, in any (t, p, d) layout, with full training or LoRA; `megaloom quantize RUN OUT --from-qat`
then makes the real quantized model (command.py), whose weights are exactly what the forward used.

What torchao does: the numerics. `QuantScheme.fake_quantize_configs` gives torchao's QAT configs of the
scheme (what `QATConfig(base_config, step="prepare")` infers from the PTQ config), and each linear holds
torchao's own `IntxFakeQuantizer` modules, named as in torchao's `FakeQuantizedLinear`; their scales
(`choose_qparams_affine`, no gradient) and rounding (`_fake_quantize_affine`, a straight-through round)
are the ones torchao's convert step and `megaloom quantize` compute.

What megaloom does: tensor parallelism. A column-parallel rank holds whole output rows, so a per-row or
per-group weight scale is local, and so is a per-token activation scale (its input holds every feature).
A row-parallel rank holds a slice of the input features: a group inside that slice is local
(megaloom/config checks that groups do not straddle ranks), but two scales span the ranks, the per-row int8
weight scale and the per-token activation scale of int8-dynamic-act-int4-weight. For those the rank's
minimum and maximum (per row, per token) are all-reduced over tp (exact: a min and a max) and torchao's
own qparams function turns them into the full row's or token's scale and zero point, which then fake-
quantize the local slice: tp = 2 computes what tp = 1 does (tests/distributed/test_qat_layouts.py).

With LoRA (peft.method = "lora") the fake quantization applies to the frozen base weight (and the base
path's input) and the adapter path stays in high precision, as torchtune's QAT + LoRA does:
y = F.linear(fq_act(x), fq(W)) + s B A x. `--from-qat` merges W + s B A and quantizes that.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaloom.compress.quantize import LINEARS, ROW_PARALLEL
from megaloom.compress.schemes import QuantScheme
from megaloom.config import Config
from megaloom.parallel.comm import TPGroup, enter_tp, leave_tp


def qat_scheme(cfg: Config) -> QuantScheme:
    """The [qat] section as the scheme `megaloom quantize` names (group_size 0 = the scheme's default)."""
    return QuantScheme.parse(cfg.qat.scheme, cfg.qat.group_size or None)


class _SpanningQuantizer(nn.Module):
    """A torchao IntxFakeQuantizer whose scale spans the tp ranks (a row-parallel layer's per-row weight
    scale, per-token activation scale): each rank's min and max along the last dim are all-reduced first."""

    def __init__(self, inner: nn.Module, tp: TPGroup):
        super().__init__()
        self.inner, self.tp = inner, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.granularity import PerToken
        from torchao.quantization.qat.utils import _fake_quantize_per_channel_group, _fake_quantize_per_token
        from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, MappingType, choose_qparams_affine
        from torchao.quantization.utils import get_group_qparams_symmetric

        cfg = self.inner.config
        with torch.no_grad():
            lo, hi = x.detach().amin(dim=-1), x.detach().amax(dim=-1)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.tp.group)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.tp.group)
            ends = torch.stack([lo, hi], dim=-1)  # (..., 2): the full row's extremes, all a scale depends on
        qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[cfg.dtype]
        if isinstance(cfg.granularity, PerToken):  # the call IntxFakeQuantizer._per_token_forward makes
            scale, zero = choose_qparams_affine(ends, MappingType.ASYMMETRIC, (*[1] * (ends.dim() - 1), 2), cfg.dtype,
                                                quant_min=qmin, quant_max=qmax, eps=cfg.eps,
                                                scale_dtype=cfg.scale_precision,
                                                zero_point_dtype=cfg.zero_point_precision)
            return _fake_quantize_per_token(x, scale, zero, qmin, qmax)
        # per row of a weight (PerAxis(0)): IntxFakeQuantizer._per_channel_or_group_forward's, group = the row
        bits = {torch.int8: 8, torch.int4: 4}[cfg.dtype]
        scale, zero = get_group_qparams_symmetric(ends, bits, 2, cfg.scale_precision, eps=cfg.eps)
        return _fake_quantize_per_channel_group(x, scale, zero.to(cfg.zero_point_precision), qmin, qmax, x.shape[-1],
                                                cfg.zero_point_domain)


class FakeQuantLinear(nn.Module):
    """A block linear (nn.Linear, or its column- or row-parallel shard) computing with torchao's fake-
    quantized weight and input. Its parameters keep their names (`weight`, `bias`), so checkpoints,
    adapters and every layout see the same model."""

    def __init__(self, linear: nn.Module, scheme: QuantScheme, row_parallel: bool, tp: TPGroup | None):
        super().__init__()
        from torchao.quantization import PerAxis
        from torchao.quantization.qat import IntxFakeQuantizer

        self.weight, self.bias = linear.weight, linear.bias
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.row_parallel = row_parallel
        act, wcfg = scheme.fake_quantize_configs()
        self.weight_fake_quantizer = IntxFakeQuantizer(wcfg)
        self.activation_fake_quantizer = IntxFakeQuantizer(act) if act is not None else None
        if self.tp is not None and row_parallel:  # the scales that span the ranks (module docstring)
            if isinstance(wcfg.granularity, PerAxis):
                self.weight_fake_quantizer = _SpanningQuantizer(self.weight_fake_quantizer, self.tp)
            if self.activation_fake_quantizer is not None:
                self.activation_fake_quantizer = _SpanningQuantizer(self.activation_fake_quantizer, self.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None and not self.row_parallel:
            x = enter_tp(x, self.tp)  # ColumnParallelLinear's f (or the sequence all-gather)
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        w = self.weight_fake_quantizer(self.weight)
        if self.tp is not None and self.row_parallel:  # RowParallelLinear: partial sums, then g, then the bias
            y = leave_tp(F.linear(x, w), self.tp)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


def prepare(chunk: nn.Module, scheme: QuantScheme, tp: TPGroup | None) -> int:
    """Put a FakeQuantLinear in place of every block linear of `chunk` (before adapters are added to
    them); returns the count."""
    done = 0
    for block in chunk.layers.values():
        for path in LINEARS:
            owner, attr = path.split(".")
            parent = getattr(block, owner)
            linear = getattr(parent, attr)
            if isinstance(linear, FakeQuantLinear):
                continue
            setattr(parent, attr, FakeQuantLinear(linear, scheme, path in ROW_PARALLEL, tp))
            done += 1
    return done


class QATHook:
    """What the cli hands the trainer for a [qat] run (`quantize=`): called on every model chunk as it is
    built, before the PEFT adapters and ZeRO wrapping."""

    def __init__(self, cfg: Config):
        self.scheme = qat_scheme(cfg)

    def __call__(self, chunk: nn.Module, tp: TPGroup | None) -> None:
        prepare(chunk, self.scheme, tp)
