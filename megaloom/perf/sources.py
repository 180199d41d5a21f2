"""Where every constant of the planner's hardware, network and efficiency models comes from.

Each entry: the constant (module.NAME, or cluster.<field> for a Cluster default) -> (kind, source).
Kinds: `measured` (our own measurement: command, device, date), `datasheet`, `paper`, `library` (a
constant of an established library's own performance model, file and version named), `derived`
(computed from other entries or counted from the program modelled, as the comment beside the
constant shows), and `assumed` — a value with no source yet, listed so it stays visible: each is
what `megaloom calibrate` or a measurement on the hardware should replace. tests/unit/test_sources.py
checks that every constant is here and lists the assumed ones.
"""

from __future__ import annotations

MEASURED_H100 = "bench/RESULTS.md (lent H100 SXM, torch 2.11.0+cu130, 2026-11-24)"
NCCL_TUNING = "NCCL 2.30.7 src/graph/tuning.cc, ncclTopoTuneModel (NVIDIA's own latency model of its collectives)"

SOURCES: dict[str, tuple[str, str]] = {
    # ------------------------------------------------------------ devices and kernels (hardware.py)
    "hardware.CATALOGUE": ("datasheet", "NVIDIA A100 (2020), H100 (2022), H200 (2024) and HGX B200 data sheets: "
                                        "dense bf16/fp8 peak, HBM capacity and bandwidth, SM count"),
    "hardware.MEASURED_GEMM": ("measured", f"bf16 matmul 8192 x 8192 x 8192, 777.8 TFLOP/s; {MEASURED_H100}"),
    "hardware.MEASURED_COPY": ("measured", f"device-to-device copy, 2,977 GB/s read + written; {MEASURED_H100}"),
    "hardware.GEMM_EFFICIENCY": ("derived", "MEASURED_GEMM over the data-sheet peak, less the tile model's losses "
                                            "(hardware._calibrate)"),
    "hardware.COPY_FRACTION": ("derived", "MEASURED_COPY over the H100 data sheet's 3.35 TB/s"),
    "hardware.TILES": ("assumed", "128 x 256 is the output tile of Hopper/Ampere bf16 cuBLAS/CUTLASS kernels; the "
                                  "relative rates of the smaller tiles (0.9, 0.75) are not measured"),
    "hardware.K_OVERHEAD": ("assumed", "a tile's prologue/epilogue cost, 256 in units of reduction depth"),
    "hardware.LAUNCH_SECONDS": ("assumed", "4 us per kernel launch and ramp"),
    # ------------------------------------------------------------ the programs modelled (costs.py, simulator.py)
    "costs.MEGATRON": ("paper", "Korthikanti et al. 2022 §4.1 (10 + 24/t bytes of activations per s·b·h); kernel "
                                "traffic counted from Megatron-LM's fused kernels (comment in costs.py)"),
    "costs.MEGATRON_2021": ("paper", "as MEGATRON with the 5·a·s/h score term (Korthikanti et al. 2022 §4.1), as "
                                     "Narayanan et al. 2021 ran"),
    "costs.EAGER": ("derived", "counted from the plain-PyTorch program (comment in costs.py); peak memory within "
                               f"3% of the 53.6 GiB measured for GPT 1.3B at 8 x 2048, {MEASURED_H100}"),
    "costs.MEGALOOM": ("derived", "EAGER with megaloom's chunked linear cross entropy as its head (megaloom/model/"
                                  "loss.py): its gradients computed in the forward, dL/dh and dL/dW kept, no logits"),
    "costs.ATTENTION_FRACTION": ("paper", "Shah et al. 2024 (FlashAttention-3), abstract: FlashAttention-2, PyTorch "
                                          "SDPA's flash kernel, reaches 35% of the H100's peak; used for every device"),
    "costs.USABLE_MEMORY": ("assumed", "0.92 of the device memory usable by tensors (CUDA context, NCCL buffers, "
                                       "fragmentation take the rest)"),
    "simulator.ADAM_BYTES_PER_PARAMETER": ("derived", "fused AdamW's reads (weight, gradient, m, v: 16 B) and "
                                                      "writes (weight, m, v: 12 B) and the bf16 copy (2 B)"),
    # ------------------------------------------------------------ networks (cluster.py defaults; presets say theirs)
    "cluster.intra_node_gbs": ("datasheet", "A100 NVSwitch: 600 GB/s bidirectional per GPU (DGX A100 data sheet)"),
    "cluster.nics_per_node": ("datasheet", "DGX A100/H100: 8 compute NICs (DGX data sheets)"),
    "cluster.nic_gbps": ("datasheet", "HDR InfiniBand: 200 Gb/s per port (NVIDIA ConnectX-6 data sheet)"),
    "cluster.levels": ("datasheet", "DGX SuperPOD reference architecture: fat-tree of leaf and spine (and core) "
                                    "switches"),
    "cluster.oversubscription": ("datasheet", "DGX SuperPOD reference architecture: non-blocking (1:1)"),
    "cluster.nodes_per_leaf": ("datasheet", "a 64-port NDR leaf switch (NVIDIA QM9700) with 32 ports down, 32 up"),
    "cluster.global_fraction": ("paper", "dragonfly: Kim, Dally, Scott & Abts 2008 (ISCA), Valiant routing, which "
                                         "adversarial group-to-group traffic such as a ring between groups needs, "
                                         "sends each packet over two global channels: half the throughput"),
    "cluster.hop_latency_us": ("assumed", "0.5 us per switch hop"),
    "cluster.nic_latency_us": ("library", f"{NCCL_TUNING}: hwLat[NET][Ring][Simple] = 14 us per ring step that "
                                          "crosses nodes (9.6 in NCCL 2.9.6 of 2021)"),
    "cluster.intra_latency_us": ("library", f"{NCCL_TUNING}: hwLat[NVLINK][Ring][Simple] = 3.4 us per ring step "
                                            "(PCIe 5.7, the h100-pcie preset); `megaloom calibrate` measures it"),
    "cluster.collective_base_us": ("library", f"{NCCL_TUNING}: baseLat[Ring][Simple] = 8.4 us per collective, "
                                              "also the tree's"),
    "cluster.intra_efficiency": ("assumed", "0.8 of the link bandwidth achieved inside a node; `megaloom "
                                            "calibrate` measures the achieved bandwidth"),
    "cluster.nic_efficiency": ("assumed", "0.9 of the link bandwidth achieved on the network"),
}

KINDS = ("measured", "datasheet", "paper", "library", "derived", "assumed")


def assumed() -> list[str]:
    """The constants that still have no source: what a measurement should replace."""
    return sorted(name for name, (kind, _) in SOURCES.items() if kind == "assumed")
