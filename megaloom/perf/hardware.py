"""Catalogue of accelerator peaks (dense, no sparsity), from the vendors' data sheets, and a model of
the fraction of that peak a GEMM of a given shape achieves.

MFU is only reported where the device is found here; CPUs and unknown devices report none rather
than a made-up peak.

The GEMM model (`gemm_seconds`) is a roofline with tile and wave quantization:

    time = max(2·m·n·k / (peak · E · wave(m, n) · depth(k)),  bytes moved / achieved memory bandwidth)

- wave(m, n): the output is cut into tiles, one per SM at a time; the last wave of tiles leaves SMs
  idle (NVIDIA, "Matrix Multiplication Background User's Guide", tile and wave quantization):
  wave = useful area / (waves · SMs · tile area). Like cuBLAS's heuristics, the model picks the best
  of three tile shapes; smaller tiles reuse less data, so they are assumed to run at 90% (128 x 128)
  and 75% (64 x 128) of the large tile's rate.
- depth(k) = k / (k + K_OVERHEAD): every tile pays a prologue/epilogue worth about K_OVERHEAD of
  reduction depth, so thin-k GEMMs (e.g. the second MLP GEMM under wide tensor parallelism) lose
  efficiency. K_OVERHEAD = 256 is an assumption, not a measurement.
- E is calibrated from the one GEMM measured on the lent H100 (2026-11-24; bench/RESULTS.md,
  docs/planner.md): bf16 8192 x 8192 x 8192 at 777.8 TFLOP/s. The same E is used for every device;
  the A100, H200 and B200 figures are therefore extrapolations until someone measures them.
- Memory-bound work moves bytes at COPY_FRACTION of the data-sheet HBM bandwidth, calibrated from
  the measured H100 device-to-device copy (2,977 GB/s of 3,350) and, again, assumed for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import ceil, log

# the fixed costs per pass `megaloom calibrate` measures (calibrate.measure_overheads); the fsdp_ ones, what one
# FSDP2 unit of megaloom's ZeRO-2/3 adds to a layer's forward, backward (ZeRO-3, ZeRO-2) and optimizer step beyond
# its collectives' own time (calibrate.measure_fsdp_overheads), only when calibrate ran on several processes
OVERHEADS = ("layer_forward", "layer_backward", "embedding_forward", "embedding_backward", "head_forward",
             "head_backward", "optimizer_layer", "optimizer_base", "fsdp_unit_forward", "fsdp_unit_backward",
             "fsdp_unit_backward_zero2", "fsdp_optimizer_layer")


@dataclass(frozen=True)
class Device:
    name: str
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak
    fp8_tflops: float
    memory_gib: float
    memory_tbps: float  # HBM bandwidth, TB/s
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that identify it
    sms: int = 132  # streaming multiprocessors: one GEMM tile each at a time
    # a device measured by `megaloom calibrate`: (m, n, k, achieved TFLOP/s) of GEMM shapes, and the
    # achieved copy bandwidth (GB/s, read + written); the models below then use these figures
    measured_gemms: tuple[tuple[int, int, int, float], ...] = ()
    copy_gbps: float = 0.0
    # seconds megaloom's program spends per pass beyond its arithmetic (calibrate.OVERHEADS names), measured;
    # a catalogue device has none (its per-kernel launch cost is in gemm_seconds)
    overheads: tuple[tuple[str, float], ...] = ()
    host_bound: bool = False  # the host runs the arithmetic (a CPU): overhead and arithmetic add up
    # the rate megaloom's own memory-bound kernels reach (GB/s read + written), fitted by `megaloom calibrate` on
    # its layer at the config's shapes (calibrate.fit_kernel_rate); 0: they move bytes at the copy bandwidth
    kernel_gbps: float = 0.0

    def overhead(self, name: str) -> float:
        return dict(self.overheads).get(name, 0.0)

    def pass_seconds(self, arithmetic: float, overhead: str) -> float:
        """A pass's time from its arithmetic and its measured fixed cost `overhead`: their sum where the host
        computes (a CPU), the longer of the two where kernels run ahead of the host (a GPU)."""
        return self.with_fixed(arithmetic, self.overhead(overhead))

    def with_fixed(self, arithmetic: float, fixed: float) -> float:
        """Arithmetic and a fixed host cost together: added on a host-bound device, the longer of the two
        where kernels run ahead of the host."""
        return arithmetic + fixed if self.host_bound else max(arithmetic, fixed)

    @property
    def copy_bytes_per_s(self) -> float:
        """Bandwidth a memory-bound kernel achieves (bytes read + written per second)."""
        if self.kernel_gbps:
            return self.kernel_gbps * 1e9
        if self.copy_gbps:
            return self.copy_gbps * 1e9
        return self.memory_tbps * 1e12 * COPY_FRACTION


CATALOGUE: tuple[Device, ...] = (
    # NVIDIA A100 data sheet: 312 TFLOP/s bf16 dense; 40 GB HBM2 1.555 TB/s, 80 GB HBM2e 2.039 TB/s; 108 SMs.
    Device("A100-40GB", 312.0, 0.0, 40, 1.555, ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB"), 108),
    Device("A100-80GB", 312.0, 0.0, 80, 2.039, ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB"), 108),
    # NVIDIA H100 data sheet: SXM 989 bf16 / 1979 fp8 dense, 80 GB 3.35 TB/s, 132 SMs;
    # PCIe 756 / 1513, 2.0 TB/s, 114 SMs.
    Device("H100-PCIe", 756.0, 1513.0, 80, 2.0, ("H100 PCIe",), 114),
    Device("H100-SXM", 989.0, 1979.0, 80, 3.35, ("H100 80GB HBM3", "H100 SXM", "H100"), 132),
    # NVIDIA H200 data sheet: 989 bf16 / 1979 fp8 dense, 141 GB HBM3e 4.8 TB/s (the H100 die, 132 SMs).
    Device("H200", 989.0, 1979.0, 141, 4.8, ("H200",), 132),
    # NVIDIA B200 (HGX B200): 2250 bf16 / 4500 fp8 dense, 180 GB HBM3e 7.7 TB/s; 148 SMs.
    Device("B200", 2250.0, 4500.0, 180, 7.7, ("B200",), 148),
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


# ---------------------------------------------------------------- GEMM efficiency

# (rows, columns, relative rate) of the output tiles: 128 x 256 is the large-GEMM tile of Hopper/Ampere
# bf16 cuBLAS kernels; the relative rates of the smaller ones are assumptions.
TILES = ((128, 256, 1.0), (128, 128, 0.9), (64, 128, 0.75))
K_OVERHEAD = 256  # assumed prologue/epilogue cost of a tile, in units of reduction depth
LAUNCH_SECONDS = 4e-6  # assumed fixed cost of one kernel (launch + ramp), typical of CUDA kernels

# The measurements (MEASURED.md, H100 SXM, torch 2.11, bf16): the calibration inputs of the model.
MEASURED_GEMM = {"device": "H100-SXM", "m": 8192, "n": 8192, "k": 8192, "tflops": 777.8}
MEASURED_COPY = {"device": "H100-SXM", "gbps": 2977.0}


def wave_efficiency(m: int, n: int, sms: int, batch: int = 1) -> float:
    """Fraction of the large tile's rate achieved when `batch` m x n outputs are cut into the best tile
    shape and run in waves of `sms` tiles (a batched GEMM schedules the tiles of all its matrices together)."""
    best = 0.0
    for tm, tn, rate in TILES:
        tiles = ceil(m / tm) * ceil(n / tn) * batch
        best = max(best, rate * (m * n * batch) / (ceil(tiles / sms) * sms * tm * tn))
    return best


def depth_efficiency(k: int) -> float:
    return k / (k + K_OVERHEAD)


def _calibrate() -> tuple[float, float]:
    g, c = MEASURED_GEMM, MEASURED_COPY
    dev = next(d for d in CATALOGUE if d.name == g["device"])
    shape = wave_efficiency(g["m"], g["n"], dev.sms) * depth_efficiency(g["k"])
    seconds = 2.0 * g["m"] * g["n"] * g["k"] / (g["tflops"] * 1e12) - LAUNCH_SECONDS
    achieved = 2.0 * g["m"] * g["n"] * g["k"] / seconds / 1e12
    return achieved / dev.bf16_tflops / shape, c["gbps"] / 1e3 / dev.memory_tbps


# E: the best fraction of peak a GEMM reaches once tiles and depth are accounted for;
# COPY_FRACTION: achieved / data-sheet memory bandwidth. Both from the H100 measurements above.
GEMM_EFFICIENCY, COPY_FRACTION = _calibrate()


@lru_cache(maxsize=65536)
def gemm_seconds(device: Device, m: int, n: int, k: int, batch: int = 1, bytes_per_element: int = 2) -> float:
    """Predicted time of `batch` bf16 GEMMs C[m, n] = A[m, k] @ B[k, n] on `device`. On a measured
    device: at the achieved rate of the nearest measured shape (log distance over m, n, k)."""
    flops = 2.0 * m * n * k * batch
    if device.measured_gemms:
        near = min(device.measured_gemms, key=lambda g: sum(log(g[i] / x) ** 2 for i, x in enumerate((m * batch, n, k))))
        return flops / (near[3] * 1e12)
    rate = device.bf16_tflops * 1e12 * GEMM_EFFICIENCY * depth_efficiency(k) * wave_efficiency(m, n, device.sms, batch)
    traffic = bytes_per_element * batch * (m * k + k * n + m * n)
    return max(flops / rate, traffic / device.copy_bytes_per_s) + LAUNCH_SECONDS


def gemm_tflops(device: Device, m: int, n: int, k: int) -> float:
    """Achieved TFLOP/s the model predicts for one GEMM."""
    return 2.0 * m * n * k / gemm_seconds(device, m, n, k) / 1e12
