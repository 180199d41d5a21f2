"""A GPU cluster as the planner sees it: nodes of GPUs, the fabric inside a node, the NICs, and the
network between nodes.

Sources for the network vocabulary (reference/003, a survey of networks for LLM training): fat-tree
(levels, oversubscription), rail-optimized fat-tree (NIC i of every node on the same leaf switch,
NVIDIA DGX SuperPOD), rail-only (Wang et al. 2023, MIT/Meta: rail switches only, no spine; traffic
between rails is forwarded over NVLink first), torus (k-ary n-cube, direct links between neighbour
nodes), dragonfly (Kim et al. 2008: all-to-all groups joined by global links) and in-network
reduction (NVIDIA SHARP, Graham et al. 2016).

Bandwidths are per direction: a data-sheet "600 GB/s NVLink" (A100) is 300 GB/s each way. Presets
and the other clusters are TOML files in megaloom/perf/clusters/; `--cluster` takes a preset name or
a path to such a file.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megaloom.config import ConfigError
from megaloom.perf.hardware import CATALOGUE, OVERHEADS, Device, lookup

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "clusters"


class Topology(enum.Enum):
    FAT_TREE = "fat-tree"
    RAIL_OPTIMIZED = "rail-optimized"
    RAIL_ONLY = "rail-only"
    TORUS = "torus"
    DRAGONFLY = "dragonfly"


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster. Field comments give the unit; megaloom/perf/sources.py gives each default's
    source (NCCL's own tuning model for the latencies; the efficiencies are still assumptions)."""

    name: str
    gpu: str = field(metadata={"help": "catalogue name of the GPU (megaloom/perf/hardware.py)"})
    gpus_per_node: int = field(metadata={"help": "GPUs in one server"})
    intra_node: str = field(default="nvswitch", metadata={"help": "nvswitch | nvlink | pcie"})
    intra_node_gbs: float = field(default=300.0, metadata={"help": "per GPU, per direction, GB/s"})
    nics_per_node: int = field(default=8, metadata={"help": "network adapters per server"})
    nic_gbps: float = field(default=200.0, metadata={"help": "per NIC, per direction, Gb/s"})
    topology: Topology = field(default=Topology.FAT_TREE, metadata={"help": "fat-tree | rail-optimized | "
                                                                              "rail-only | torus | dragonfly"})
    levels: int = field(default=2, metadata={"help": "fat-tree: switch levels"})
    oversubscription: float = field(default=1.0, metadata={"help": "fat-tree: downlinks per uplink above a leaf"})
    nodes_per_leaf: int = field(default=32, metadata={"help": "nodes under one leaf (rail) switch; dragonfly: "
                                                                "nodes per group"})
    torus_dims: tuple[int, ...] = field(default=(), metadata={"help": "torus: nodes along each dimension"})
    global_fraction: float = field(default=0.5, metadata={"help": "dragonfly: global-link bandwidth between "
                                                                   "groups, as a fraction of the NICs'"})
    sharp: bool = field(default=False, metadata={"help": "in-network reduction (SHARP) in the switches"})
    hop_latency_us: float = field(default=0.5, metadata={"help": "latency per switch hop or torus link"})
    # NCCL's tuning model (src/graph/tuning.cc, NCCL 2.30.7), Simple protocol, ring: 14 us per step
    # that crosses the network, 3.4 us per NVLink step (PCIe: 5.7), 8.4 us per collective
    nic_latency_us: float = field(default=14.0, metadata={"help": "latency of one ring step across the network"})
    intra_latency_us: float = field(default=3.4, metadata={"help": "latency of one NVLink/PCIe ring step or message"})
    collective_base_us: float = field(default=8.4, metadata={"help": "fixed latency of one collective (launch)"})
    intra_efficiency: float = field(default=0.8, metadata={"help": "achieved / link bandwidth inside a node"})
    nic_efficiency: float = field(default=0.9, metadata={"help": "achieved / link bandwidth on the network"})

    measured: Device | None = field(default=None, metadata={"help": "[measured_device] table: written by "
                                                                      "`megaloom calibrate` (gpu = \"measured\")"})

    @property
    def device(self) -> Device:
        if self.measured is not None:
            return self.measured
        d = lookup(self.gpu)
        assert d is not None  # checked when the cluster is built
        return d

    @property
    def intra_bytes_per_s(self) -> float:
        return self.intra_node_gbs * 1e9 * self.intra_efficiency

    @property
    def nic_bytes_per_s(self) -> float:
        return self.nic_gbps / 8 * 1e9 * self.nic_efficiency

    @property
    def node_nic_bytes_per_s(self) -> float:
        """Everything a node can inject into the network."""
        return self.nics_per_node * self.nic_bytes_per_s

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def rail(self, rank: int) -> int:
        """The NIC a GPU uses: GPU i of a node sits on rail i (one NIC per GPU, or shared evenly)."""
        return rank % self.gpus_per_node * self.nics_per_node // self.gpus_per_node

    def describe(self) -> str:
        d = self.device
        net = self.topology.value
        if self.topology is Topology.FAT_TREE:
            net += f" ({self.levels} levels, {self.oversubscription:g}:1)"
        if self.topology is Topology.TORUS:
            net += " " + "x".join(map(str, self.torus_dims))
        return (f"{self.name}: {self.gpus_per_node}x {d.name} per node, {self.intra_node} "
                f"{self.intra_node_gbs:g} GB/s, {self.nics_per_node}x {self.nic_gbps:g} Gb/s NICs, {net}"
                + (", SHARP" if self.sharp else ""))


def _measured_device(t: dict, where: str) -> Device:
    need = ("name", "peak_tflops", "memory_gib", "copy_gbps", "gemms")
    missing = [k for k in need if k not in t]
    if missing:
        raise ConfigError(f"{where}: [measured_device] lacks {', '.join(missing)}; rerun `megaloom calibrate`")
    gemms = tuple((int(m), int(n), int(k), float(tf)) for m, n, k, tf in t["gemms"])
    if not gemms or any(g[3] <= 0 for g in gemms):
        raise ConfigError(f"{where}: [measured_device] gemms must be non-empty [m, n, k, TFLOP/s] rows with positive rates")
    overheads = t.get("overheads_us", {})
    known = set(OVERHEADS)
    if not isinstance(overheads, dict) or set(overheads) - known or any(float(v) < 0 for v in overheads.values()):
        raise ConfigError(f"{where}: [measured_device.overheads_us] takes non-negative microseconds for "
                          f"{', '.join(OVERHEADS)}; rerun `megaloom calibrate`")
    kernel = t.get("kernel_gbps", 0.0)
    if not isinstance(kernel, (int, float)) or kernel < 0:
        raise ConfigError(f"{where}: [measured_device] kernel_gbps = {kernel!r} must be a non-negative rate in GB/s; "
                          "rerun `megaloom calibrate`")
    return Device(str(t["name"]), float(t["peak_tflops"]), 0.0, float(t["memory_gib"]), float(t["copy_gbps"]) / 1e3,
                  (), 1, gemms, float(t["copy_gbps"]),
                  tuple((k, float(overheads[k]) * 1e-6) for k in OVERHEADS if k in overheads),
                  bool(t.get("host_bound", False)), float(kernel))


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_cluster(name_or_file: str, **overrides: object) -> Cluster:
    """A preset by name (`dgx-a100`) or a TOML file; keyword overrides replace fields (e.g. sharp=True)."""
    path = Path(name_or_file)
    if not path.suffix and (PRESET_DIR / f"{name_or_file}.toml").is_file():
        path = PRESET_DIR / f"{name_or_file}.toml"
    if not path.is_file():
        raise ConfigError(f"--cluster {name_or_file!r} is neither a preset ({', '.join(presets())}) nor a TOML "
                          f"file; pass one of those names or a file like megaloom/perf/clusters/dgx-h100.toml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--cluster {name_or_file!r}: not valid TOML: {e}") from None
    return cluster_from_text(text, str(path), {"name": path.stem}, overrides, name_or_file)


def cluster_from_text(text: str, where: str, defaults: dict | None = None, overrides: dict | None = None,
                      given: str | None = None) -> Cluster:
    """A Cluster from the text of a cluster TOML file (`where` names it in errors; `given`, what --cluster said)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--cluster {given or where!r}: not valid TOML: {e}") from None
    raw = {**(defaults or {}), **raw, **(overrides or {})}
    return make_cluster(raw, where)


def make_cluster(raw: dict, where: str = "cluster") -> Cluster:
    """Build and check a Cluster from plain values (a TOML table)."""
    raw = dict(raw)
    measured = raw.pop("measured_device", None)
    names = {f.name for f in dataclasses.fields(Cluster)} - {"measured"}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
    for key in ("gpu", "gpus_per_node"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    values = {"name": where, **raw}
    try:
        values["topology"] = Topology(values.get("topology", "fat-tree"))
    except ValueError:
        raise ConfigError(f"{where}: topology = {raw['topology']!r}; choose one of "
                          f"{', '.join(t.value for t in Topology)}") from None
    values["torus_dims"] = tuple(values.get("torus_dims", ()))
    if (measured is None) != (raw.get("gpu") != "measured"):
        raise ConfigError(f"{where}: gpu = \"measured\" and a [measured_device] table go together "
                          f"(`megaloom calibrate` writes both)")
    if measured is not None:
        values["measured"] = _measured_device(measured, where)
    c = Cluster(**values)
    if c.measured is None and lookup(c.gpu) is None:
        raise ConfigError(f"{where}: gpu = {c.gpu!r} is not in the catalogue; choose one of "
                          f"{', '.join(d.name for d in CATALOGUE)}")
    if c.intra_node not in ("nvswitch", "nvlink", "pcie"):
        raise ConfigError(f"{where}: intra_node = {c.intra_node!r}; choose nvswitch, nvlink or pcie")
    for key in ("gpus_per_node", "nics_per_node", "levels", "nodes_per_leaf"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{where}: {key} = {getattr(c, key)} must be >= 1")
    if c.topology is Topology.TORUS and not c.torus_dims:
        raise ConfigError(f"{where}: topology = \"torus\" needs torus_dims, e.g. torus_dims = [8, 8, 6]")
    if c.topology is Topology.TORUS and c.sharp:
        raise ConfigError(f"{where}: sharp = true needs switches, and a torus has none; set sharp = false")
    if c.oversubscription < 1 or not 0 < c.global_fraction <= 1:
        raise ConfigError(f"{where}: oversubscription must be >= 1 and global_fraction in (0, 1]")
    return c
