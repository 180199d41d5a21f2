"""Quantization schemes as torchao configs: what `megaloom quantize --method` names, and what
quantization-aware training will name (one scheme, one torchao config, wherever it is used).

torchao 0.18 on a CPU: Int8WeightOnlyConfig and Int8DynamicActivationInt8WeightConfig run in fp32 and
bf16. Int4WeightOnlyConfig does not: its packing formats need CUDA and bf16 (tile_packed_to_4d) or the
mslk kernels (plain, preshuffled), and plain_int32 has no CPU support. int4 weights are therefore
IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g)): symmetric int4 values
(-8..7) with one scale per group of g input features, held unpacked in int8 by torchao
(IntxUnpackedToInt8Tensor) and computed by dequantising; megaloom packs two values per byte on disk.
int8-dynamic-act-int4-weight is the same int4 weight with int8 activations, asymmetric per token at run
time (Int8DynamicActivationIntxWeightConfig, also CPU-ready).

Quantization-aware training ([qat], compress/qat.py) names the same schemes: `fake_quantize_configs`
gives the torchao fake-quantization configs whose forward equals the quantized model's (same scales
and zero points; tests/unit/test_qat.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from megaloom.errors import ConfigError


class Method(enum.Enum):
    INT8_WEIGHT = "int8-weight"
    INT8_DYNAMIC = "int8-dynamic"
    INT4_WEIGHT = "int4-weight"
    INT8_DYNAMIC_INT4 = "int8-dynamic-act-int4-weight"
    GPTQ = "gptq"


DEFAULT_INT4_GROUP = 32  # divides SmolLM2's 576 and 1536 input features, also per rank at tp = 2


@dataclass(frozen=True)
class QuantScheme:
    """A method and its group size: None for int8 means one scale per output row (torchao's PerRow);
    int4 and GPTQ always use groups of `group_size` input features."""

    method: Method
    group_size: int | None = None

    @staticmethod
    def parse(method: str, group_size: int | None = None) -> QuantScheme:
        try:
            m = Method(method)
        except ValueError:
            raise ConfigError(f"--method '{method}' is not a quantization method; use one of "
                              f"{', '.join(x.value for x in Method)}") from None
        if group_size is not None and group_size < 1:
            raise ConfigError(f"--group-size {group_size} must be positive (or left out: per row for int8, "
                              f"{DEFAULT_INT4_GROUP} for int4)")
        if m is Method.INT8_DYNAMIC and group_size is not None:
            raise ConfigError(f"--method int8-dynamic takes no --group-size ({group_size}): torchao 0.18 scales its "
                              "weights per row (its activations are quantized per token); leave --group-size out")
        if m in (Method.INT4_WEIGHT, Method.INT8_DYNAMIC_INT4, Method.GPTQ) and group_size is None:
            group_size = DEFAULT_INT4_GROUP
        return QuantScheme(m, group_size)

    @property
    def bits(self) -> int:
        return 8 if self.method in (Method.INT8_WEIGHT, Method.INT8_DYNAMIC) else 4

    def torchao_config(self):  # noqa: ANN201 (a torchao AOBaseConfig)
        """The torchao config whose quantize_ produces this scheme's weights (GPTQ: the format its
        integers are stored in; the integers themselves come from gptq.py)."""
        import torch
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
            PerRow,
        )

        granularity = PerRow() if self.group_size is None else PerGroup(self.group_size)
        if self.method is Method.INT8_WEIGHT:
            return Int8WeightOnlyConfig(granularity=granularity)
        if self.method is Method.INT8_DYNAMIC:
            return Int8DynamicActivationInt8WeightConfig(granularity=granularity)
        if self.method is Method.INT8_DYNAMIC_INT4:
            from torchao.quantization import Int8DynamicActivationIntxWeightConfig

            return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                         weight_granularity=PerGroup(self.group_size))
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size))

    def fake_quantize_configs(self):  # noqa: ANN201 (torchao FakeQuantizeConfigBase | None, twice)
        """(activation, weight) torchao QAT configs whose fake quantization equals this scheme's
        quantization: torchao's own inference from the PTQ config (what `QATConfig(base_config)`
        prepares) where it has one; int8-weight has none in torchao 0.18, and its
        IntxFakeQuantizeConfig here (symmetric int8, per row or per group) gives Int8Tensor's
        scales bit for bit."""
        import torch
        from torchao.quantization import PerAxis, PerGroup
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

        if self.method is Method.INT8_WEIGHT:
            granularity = PerAxis(0) if self.group_size is None else PerGroup(self.group_size)
            return None, IntxFakeQuantizeConfig(torch.int8, granularity=granularity, is_symmetric=True)
        if self.method in (Method.INT4_WEIGHT, Method.INT8_DYNAMIC_INT4):
            return _infer_fake_quantize_configs(self.torchao_config())
        raise ValueError(f"{self.method.value} has no quantization-aware training in megaloom")

    def check_width(self, name: str, in_features: int, tp: int = 1, row_parallel: bool = False) -> None:
        """Groups must tile the input features, and for a row-parallel layer each rank's share of them:
        a group that straddled two ranks would need both halves to choose its scale."""
        if self.group_size is None:
            return
        width = in_features // tp if row_parallel else in_features
        if width % self.group_size:
            where = f"each rank's {width} of its {in_features} input features at tp = {tp}" if row_parallel and tp > 1 \
                else f"its {in_features} input features"
            raise ConfigError(f"--group-size {self.group_size} does not divide {where} ({name}); pick a group "
                              f"size that divides {width}")

    def record(self) -> dict:
        return {"method": self.method.value, "group_size": self.group_size, "bits": self.bits}
