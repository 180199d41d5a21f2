"""Time of collective operations under the alpha-beta (latency-bandwidth) model.

A message of S bytes over a link of latency alpha and bandwidth beta takes alpha + S/beta (Hockney
1994). The algorithms and their costs, n ranks, S = the full buffer per rank:

- ring all-reduce: 2(n-1)·alpha + 2·(n-1)/n · S/beta (Patarasuk & Yuan 2009; Thakur, Rabenseifner &
  Gropp 2005, "Optimization of Collective Communication Operations in MPICH", §4);
- ring reduce-scatter and all-gather: (n-1)·alpha + (n-1)/n · S/beta (Thakur et al. 2005);
- tree all-reduce: a pipelined reduce up and broadcast down two binary trees, 2·ceil(log2 n)·alpha +
  2·S/beta (Sanders, Speck & Träff 2009, double binary trees, as NCCL 2.4 uses);
- hierarchical all-reduce: reduce-scatter inside each node (k ranks), all-reduce of S/k across the
  N nodes by each local rank on its own NIC, all-gather inside the node (Goyal et al. 2017 §4;
  NCCL's CollNet/NVLS tree);
- in-network reduction (SHARP, Graham et al. 2016): the switches add, so every byte leaves and
  enters each NIC once: 2·alpha + S/beta instead of the ring's 2·(n-1)/n·S/beta, half the traffic;
- pairwise all-to-all: (n-1)·alpha + (n-1)/n · S/beta, with the cross-node part slowed by the
  network's bisection (Thakur et al. 2005);
- point-to-point: alpha + S/beta.

Latency as NCCL's own tuning model counts it (src/graph/tuning.cc, `ncclTopoTuneModel`, NCCL 2.7 to
2.30): every collective pays a base latency (`Cluster.collective_base_us`) once; a ring pays one step
latency per step, the steps that cross between nodes at the network's (`nic_latency_us`) and the
others at NVLink's or PCIe's (`intra_latency_us`); a tree all-reduce pays 2·((k-1)·intra + log2(N)·
inter) for k ranks per node on N nodes. Textbook formulas above charge every step alike; on a ring of
1,536 GPUs on 192 nodes only 191 of the 1,535 steps of an all-gather cross the network.

Where a group's ranks sit decides alpha and beta (`placement`): inside one node the NVSwitch/PCIe
link; across nodes the NICs, shared by the GPUs of a node, tapered by fat-tree oversubscription,
dragonfly global links or torus dimensions, forwarded over NVLink between rails of a rail-only
network. Every GPU of a node is assumed busy in a group of the same kind at the same time (the
tensor-, data- or pipeline-parallel groups run in lockstep), so each gets its share of the NICs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import lru_cache
from math import ceil, log2

from megaloom.perf.cluster import Cluster, Topology


class Collective(enum.Enum):
    ALL_REDUCE = "all-reduce"
    REDUCE_SCATTER = "reduce-scatter"
    ALL_GATHER = "all-gather"
    ALL_TO_ALL = "all-to-all"
    P2P = "p2p"


class Algorithm(enum.Enum):
    RING = "ring"
    TREE = "tree"
    HIERARCHICAL = "hierarchical"
    AUTO = "auto"  # the fastest of the above, as NCCL's tuner picks


# ---------------------------------------------------------------- the formulas


def ring_all_reduce(n: int, size: float, alpha: float, beta: float) -> float:
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * size / beta if n > 1 else 0.0


def ring_reduce_scatter(n: int, size: float, alpha: float, beta: float) -> float:
    """`size` is the full (unsharded) buffer; all-gather costs the same with `size` its full output."""
    return (n - 1) * alpha + (n - 1) / n * size / beta if n > 1 else 0.0


ring_all_gather = ring_reduce_scatter


def tree_all_reduce(n: int, size: float, alpha: float, beta: float) -> float:
    return 2 * ceil(log2(n)) * alpha + 2 * size / beta if n > 1 else 0.0


def sharp_all_reduce(n: int, size: float, alpha: float, beta: float) -> float:
    return 2 * alpha + size / beta if n > 1 else 0.0


def pairwise_all_to_all(n: int, size: float, alpha: float, beta: float) -> float:
    return (n - 1) * alpha + (n - 1) / n * size / beta if n > 1 else 0.0


def point_to_point(size: float, alpha: float, beta: float) -> float:
    return alpha + size / beta


# ---------------------------------------------------------------- where the ranks sit


@dataclass(frozen=True)
class Placement:
    """How a group of ranks spreads over the cluster."""

    size: int
    nodes: int  # distinct nodes
    per_node: int  # ranks of the group on each node (the most on any node)
    rails: int  # distinct rails (local NIC indices) among the ranks
    leaves: int  # distinct leaf switches (fat-tree, rail) or dragonfly groups
    torus_hops: float  # mean hops between consecutive nodes of the group on a torus

    @property
    def intra_node(self) -> bool:
        return self.nodes == 1


def placement(cluster: Cluster, ranks: tuple[int, ...]) -> Placement:
    nodes = sorted({cluster.node(r) for r in ranks})
    per_node = max(sum(1 for r in ranks if cluster.node(r) == n) for n in nodes)
    leaves = len({n // cluster.nodes_per_leaf for n in nodes})
    return Placement(len(ranks), len(nodes), per_node, len({cluster.rail(r) for r in ranks}), leaves,
                     _torus_hops(cluster, nodes))


def _torus_hops(cluster: Cluster, nodes: list[int]) -> float:
    """Mean shortest-path hops between consecutive nodes of the group on the torus (wraparound links)."""
    if cluster.topology is not Topology.TORUS or len(nodes) < 2:
        return 1.0
    dims = cluster.torus_dims

    def coords(n: int) -> list[int]:
        out = []
        for d in dims:
            n, c = divmod(n, d)
            out.append(c)
        return out

    hops = []
    for a, b in zip(nodes, nodes[1:] + nodes[:1]):
        ca, cb = coords(a), coords(b)
        hops.append(sum(min(abs(x - y), d - abs(x - y)) for x, y, d in zip(ca, cb, dims)))
    return max(1.0, sum(hops) / len(hops))


@dataclass(frozen=True)
class Link:
    alpha: float  # seconds
    beta: float  # bytes per second

    def time(self, size: float) -> float:
        return point_to_point(size, self.alpha, self.beta)


def intra_link(c: Cluster) -> Link:
    return Link(c.intra_latency_us * 1e-6, c.intra_bytes_per_s)


def inter_link(c: Cluster, p: Placement) -> Link:
    """Latency and per-GPU bandwidth across nodes for a group placed as `p`."""
    share = c.node_nic_bytes_per_s / c.gpus_per_node  # every GPU of the node is talking at once
    hops: float = 1.0
    if c.topology in (Topology.FAT_TREE, Topology.RAIL_OPTIMIZED):
        same_leaf = p.leaves == 1 and (c.topology is Topology.FAT_TREE or p.rails == 1)
        hops = 1 if same_leaf else 2 * c.levels - 1
        if p.leaves > 1:
            share /= c.oversubscription
    elif c.topology is Topology.RAIL_ONLY:
        # no spine: a rank on another rail is reached by forwarding over NVLink to the right GPU first
        if p.rails > 1 and p.per_node == 1:
            hops = 1
            share = min(share, c.intra_bytes_per_s)
            return Link((c.nic_latency_us + hops * c.hop_latency_us + c.intra_latency_us) * 1e-6, share)
    elif c.topology is Topology.TORUS:
        # a ring in one torus dimension uses 2 of the node's 2·dims links
        hops = p.torus_hops
        share /= len(c.torus_dims)
    elif c.topology is Topology.DRAGONFLY:
        hops = 1 if p.leaves == 1 else 3
        if p.leaves > 1:
            share *= c.global_fraction
    return Link((c.nic_latency_us + hops * c.hop_latency_us) * 1e-6, share)


def bisection_fraction(c: Cluster, p: Placement) -> float:
    """All-to-all traffic crosses the network's bisection. Fat-tree oversubscription and dragonfly global
    links already taper `inter_link`'s bandwidth; a torus adds its narrow bisection: 2·N/k links cross the
    cut of a k-ary n-cube each way, each 1/(2·dims) of a node's injection, against N/2 nodes sending."""
    if p.nodes > 1 and c.topology is Topology.TORUS:
        return min(1.0, 4 / (max(c.torus_dims) * len(c.torus_dims)))
    return 1.0


# ---------------------------------------------------------------- collectives on a cluster


@lru_cache(maxsize=65536)
def collective_seconds(c: Cluster, op: Collective, size: float, ranks: tuple[int, ...],
                       algorithm: Algorithm = Algorithm.AUTO) -> float:
    """Time of `op` on a buffer of `size` bytes per rank over the group `ranks`."""
    n = len(ranks)
    if n == 1 or size == 0:
        return 0.0
    p = placement(c, ranks)
    intra = intra_link(c)
    if op is Collective.P2P:
        if n != 2:
            raise ValueError(f"p2p is between 2 ranks, got {n}")
        return (intra if p.intra_node else inter_link(c, p)).time(size)
    base = c.collective_base_us * 1e-6
    if p.intra_node:
        return base + _on_one_link(op, n, size, intra, algorithm)
    inter = inter_link(c, p)
    if op is Collective.ALL_TO_ALL:
        k = p.per_node
        cross = (n - k) / n * size / (inter.beta * bisection_fraction(c, p))
        local = (k - 1) / n * size / intra.beta
        return base + (k - 1) * intra.alpha + (n - k) * inter.alpha + max(cross, local)
    # a flat ring or tree through the nodes: NCCL runs one channel per local rank, each on its own NIC
    beta = min(intra.beta, p.per_node * inter.beta)
    options = {}
    if algorithm in (Algorithm.RING, Algorithm.AUTO):
        # the ring's steps at NVLink latency, then the N-1 (all-reduce: 2(N-1)) that cross nodes at the network's
        inter_steps = (2 if op is Collective.ALL_REDUCE else 1) * (p.nodes - 1)
        options[Algorithm.RING] = (_on_one_link(op, n, size, Link(intra.alpha, beta), Algorithm.RING)
                                   + inter_steps * (inter.alpha - intra.alpha))
    if algorithm in (Algorithm.TREE, Algorithm.AUTO) and op is Collective.ALL_REDUCE:
        options[Algorithm.TREE] = (2 * ((p.per_node - 1) * intra.alpha + ceil(log2(p.nodes)) * inter.alpha)
                                   + 2 * size / beta)
    # NCCL's all-gather and reduce-scatter across nodes are rings (its tuner skips every other algorithm for
    # them, tuning.cc; PAT, NCCL 2.23+, serves one GPU per node only and is not modelled): no hierarchy
    if op is Collective.ALL_REDUCE and algorithm in (Algorithm.HIERARCHICAL, Algorithm.AUTO):
        options[Algorithm.HIERARCHICAL] = _hierarchical(c, op, size, p, intra, inter)
    if not options:
        raise ValueError(f"{algorithm.value} is not an algorithm for {op.value}")
    return base + min(options.values())


def _on_one_link(op: Collective, n: int, size: float, link: Link, algorithm: Algorithm) -> float:
    a, b = link.alpha, link.beta
    if op is Collective.ALL_REDUCE:
        if algorithm is Algorithm.TREE:
            return tree_all_reduce(n, size, a, b)
        if algorithm is Algorithm.RING:
            return ring_all_reduce(n, size, a, b)
        return min(ring_all_reduce(n, size, a, b), tree_all_reduce(n, size, a, b))
    if op is Collective.ALL_TO_ALL:
        return pairwise_all_to_all(n, size, a, b)
    return ring_reduce_scatter(n, size, a, b)


def _hierarchical(c: Cluster, op: Collective, size: float, p: Placement, intra: Link, inter: Link) -> float:
    """Inside the node first (k ranks), then across the N nodes with S/k per local rank, in parallel."""
    k, nodes = p.per_node, p.nodes
    inside = ring_reduce_scatter(k, size, intra.alpha, intra.beta)
    shard = size / k
    if op is Collective.ALL_REDUCE:
        if c.sharp:
            across = sharp_all_reduce(nodes, shard, inter.alpha, inter.beta)
        else:
            across = min(ring_all_reduce(nodes, shard, inter.alpha, inter.beta),
                         tree_all_reduce(nodes, shard, inter.alpha, inter.beta))
        return 2 * inside + across
    return inside + ring_reduce_scatter(nodes, shard, inter.alpha, inter.beta)
