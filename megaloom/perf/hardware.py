"""Catalogue of accelerator peaks (dense, no sparsity), from the vendors' data sheets.

MFU is only reported where the device is found here; CPUs and unknown devices report none rather
than a made-up peak.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak
    fp8_tflops: float
    memory_gib: float
    memory_tbps: float  # HBM bandwidth, TB/s
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that identify it


CATALOGUE: tuple[Device, ...] = (
    # NVIDIA A100 data sheet: 312 TFLOP/s bf16 dense; 40 GB HBM2 1.555 TB/s, 80 GB HBM2e 2.039 TB/s.
    Device("A100-40GB", 312.0, 0.0, 40, 1.555, ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB")),
    Device("A100-80GB", 312.0, 0.0, 80, 2.039, ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB")),
    # NVIDIA H100 data sheet: SXM 989 bf16 / 1979 fp8 dense, 80 GB 3.35 TB/s; PCIe 756 / 1513, 2.0 TB/s.
    Device("H100-PCIe", 756.0, 1513.0, 80, 2.0, ("H100 PCIe",)),
    Device("H100-SXM", 989.0, 1979.0, 80, 3.35, ("H100 80GB HBM3", "H100 SXM", "H100")),
    # NVIDIA H200 data sheet: 989 bf16 / 1979 fp8 dense, 141 GB HBM3e 4.8 TB/s.
    Device("H200", 989.0, 1979.0, 141, 4.8, ("H200",)),
    # NVIDIA B200 (HGX B200): 2250 bf16 / 4500 fp8 dense, 180 GB HBM3e 7.7 TB/s.
    Device("B200", 2250.0, 4500.0, 180, 7.7, ("B200",)),
)


def lookup(name: str) -> Device | None:
    """The catalogue entry for a device name (exact catalogue name or a torch device string)."""
    for d in CATALOGUE:
        if name == d.name:
            return d
    for d in CATALOGUE:  # most specific first: PCIe before the generic "H100"
        if any(m in name for m in d.match):
            return d
    return None


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s for MFU, or None where megaloom does not know the device (e.g. a CPU).

    fp32 runs are measured against the bf16 tensor-core peak too (TF32 would differ); MFU is
    conventionally quoted against the 16-bit dense peak.
    """
    if not device_name:
        return None
    d = lookup(device_name)
    return None if d is None else d.bf16_tflops * 1e12
