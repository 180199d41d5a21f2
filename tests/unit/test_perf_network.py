"""Clusters, the GEMM model and the collectives against the alpha-beta formulas they cite."""

from math import log2

import pytest

from megaloom.config import ConfigError
from megaloom.perf import collectives as cc
from megaloom.perf.cluster import Topology, load_cluster, make_cluster, presets
from megaloom.perf.collectives import Algorithm, Collective, collective_seconds, inter_link, intra_link, placement
from megaloom.perf.hardware import GEMM_EFFICIENCY, gemm_tflops, lookup, wave_efficiency

A100 = load_cluster("dgx-a100")
MB = 2**20


def test_presets_load_and_match_the_issue():
    assert {"dgx-a100", "dgx-h100"} <= set(presets())
    for name in presets():
        load_cluster(name)
    h = load_cluster("dgx-h100")
    assert (A100.gpus_per_node, A100.intra_node_gbs * 2, A100.nic_gbps, A100.topology) == (8, 600, 200, Topology.FAT_TREE)
    assert (h.gpu, h.intra_node_gbs * 2, h.nic_gbps) == ("H100-SXM", 900, 400)


@pytest.mark.parametrize("raw,match", [
    ({"gpus_per_node": 8}, "missing key 'gpu'"),
    ({"gpu": "V100", "gpus_per_node": 8}, "not in the catalogue"),
    ({"gpu": "B200", "gpus_per_node": 8, "topology": "ring"}, "topology = 'ring'"),
    ({"gpu": "B200", "gpus_per_node": 8, "topology": "torus"}, "needs torus_dims"),
    ({"gpu": "B200", "gpus_per_node": 8, "topology": "torus", "torus_dims": [4], "sharp": True}, "a torus has none"),
    ({"gpu": "B200", "gpus_per_node": 8, "nic_speed": 1}, "unknown key 'nic_speed'"),
])
def test_bad_cluster_files(raw, match):
    with pytest.raises(ConfigError, match=match):
        make_cluster(raw)


def test_unknown_cluster_names_the_presets():
    with pytest.raises(ConfigError, match="--cluster 'dgx-z9' is neither a preset \\(dgx-a100"):
        load_cluster("dgx-z9")


def test_gemm_model_reproduces_its_calibration():
    h100 = lookup("H100-SXM")
    assert gemm_tflops(h100, 8192, 8192, 8192) == pytest.approx(777.8, rel=1e-6)  # MEASURED.md
    assert 0.7 < GEMM_EFFICIENCY < 0.95
    # wave quantization: 132 SMs, 128x256 tiles; 8192² = 2048 tiles = 15.5 waves -> 2048/(16·132)
    assert wave_efficiency(8192, 8192, 132) == pytest.approx(2048 / (16 * 132))
    # thin or small GEMMs run further from peak than big square ones
    assert gemm_tflops(h100, 8192, 8192, 256) < 0.6 * gemm_tflops(h100, 8192, 8192, 8192)
    assert gemm_tflops(h100, 512, 512, 512) < 0.3 * gemm_tflops(h100, 8192, 8192, 8192)


def test_formulas_by_hand():
    a, b, n, S = 5e-6, 100e9, 8, 64 * MB
    assert cc.ring_all_reduce(n, S, a, b) == pytest.approx(2 * 7 * a + 2 * 7 / 8 * S / b)
    assert cc.ring_reduce_scatter(n, S, a, b) == pytest.approx(7 * a + 7 / 8 * S / b)
    assert cc.ring_all_gather(n, S, a, b) == cc.ring_reduce_scatter(n, S, a, b)
    assert cc.tree_all_reduce(n, S, a, b) == pytest.approx(2 * log2(8) * a + 2 * S / b)
    assert cc.sharp_all_reduce(n, S, a, b) == pytest.approx(2 * a + S / b)
    assert cc.point_to_point(S, a, b) == pytest.approx(a + S / b)
    assert cc.ring_all_reduce(1, S, a, b) == 0


def test_inside_a_node_is_the_ring_on_nvswitch():
    link = intra_link(A100)
    assert link.beta == pytest.approx(300e9 * 0.8)
    base = A100.collective_base_us * 1e-6
    t = collective_seconds(A100, Collective.ALL_REDUCE, 64 * MB, tuple(range(8)), Algorithm.RING)
    assert t == pytest.approx(base + cc.ring_all_reduce(8, 64 * MB, link.alpha, link.beta))
    t = collective_seconds(A100, Collective.P2P, 64 * MB, (0, 1))
    assert t == pytest.approx(link.alpha + 64 * MB / link.beta)


def test_placement_of_groups():
    dp = tuple(range(0, 64, 8))  # tp = 8: one rank per node, all on rail 0
    p = placement(A100, dp)
    assert (p.nodes, p.per_node, p.rails) == (8, 1, 1)
    p = placement(A100, tuple(range(0, 64, 2)))  # tp = 2: four ranks of the group on each node
    assert (p.nodes, p.per_node) == (8, 4)


def test_across_nodes_hierarchical_by_hand():
    ranks = tuple(range(0, 64, 2))  # 8 nodes x 4 ranks
    S = 256 * MB
    p = placement(A100, ranks)
    intra, inter = intra_link(A100), inter_link(A100, p)
    assert inter.beta == pytest.approx(200e9 / 8 * 0.9)  # one NIC's share per GPU
    base = A100.collective_base_us * 1e-6
    hier = base + (2 * cc.ring_reduce_scatter(4, S, intra.alpha, intra.beta)
                   + min(cc.ring_all_reduce(8, S / 4, inter.alpha, inter.beta),
                         cc.tree_all_reduce(8, S / 4, inter.alpha, inter.beta)))
    assert collective_seconds(A100, Collective.ALL_REDUCE, S, ranks, Algorithm.HIERARCHICAL) == pytest.approx(hier)
    # NCCL's ring: 2·(32-1) steps, of which 2·(8-1) cross nodes at the network's latency, the rest at NVLink's
    flat = base + 2 * 7 * inter.alpha + (62 - 14) * intra.alpha + 2 * 31 / 32 * S / min(intra.beta, 4 * inter.beta)
    assert collective_seconds(A100, Collective.ALL_REDUCE, S, ranks, Algorithm.RING) == pytest.approx(flat)
    tree = base + 2 * (3 * intra.alpha + 3 * inter.alpha) + 2 * S / min(intra.beta, 4 * inter.beta)
    assert collective_seconds(A100, Collective.ALL_REDUCE, S, ranks, Algorithm.TREE) == pytest.approx(tree)
    assert collective_seconds(A100, Collective.ALL_REDUCE, S, ranks) == pytest.approx(min(hier, flat, collective_seconds(
        A100, Collective.ALL_REDUCE, S, ranks, Algorithm.TREE)))


def test_a_ring_across_many_nodes_pays_the_network_latency_only_where_it_crosses():
    """NCCL's tuning model: an all-gather over 1,536 GPUs on 192 nodes has 1,535 steps, 191 of them across
    the network (14 us each, plus 0.5 us for each of the 5 switch hops of a 3-level fat-tree), the rest over
    NVLink (3.4 us), plus 8.4 us once: 7.7 ms of latency. (NCCL runs no hierarchical all-gather: its tuner
    offers only the ring for it.)"""
    ranks = tuple(range(1536))
    latency = collective_seconds(A100, Collective.ALL_GATHER, 1.0, ranks)
    assert latency == pytest.approx((8.4 + 191 * (14.0 + 5 * 0.5) + 1344 * 3.4) * 1e-6, rel=1e-3)


def test_sharp_halves_the_inter_node_all_reduce():
    ranks, S = tuple(range(0, 512, 8)), 1024 * MB  # 64 nodes, one rank each
    plain = collective_seconds(A100, Collective.ALL_REDUCE, S, ranks)
    sharp = collective_seconds(load_cluster("dgx-a100", sharp=True), Collective.ALL_REDUCE, S, ranks)
    assert sharp == pytest.approx(plain / 2, rel=0.05)


def test_topologies_order_as_the_survey_says():
    """reference/003: oversubscription slows cross-leaf traffic; a torus is poor at all-to-all; rail-only
    keeps same-rail collectives at full speed but forwards cross-rail traffic over NVLink."""
    ranks, S = tuple(range(0, 1024, 8)), 512 * MB  # 128 nodes, same rail
    t = {name: collective_seconds(load_cluster(name), Collective.ALL_REDUCE, S, ranks)
         for name in ("dgx-h100", "h100-fat-tree-4to1", "h100-rail-only", "h100-rail-optimized", "h100-torus")}
    assert t["h100-fat-tree-4to1"] > 3 * t["dgx-h100"]
    assert t["h100-rail-only"] == pytest.approx(t["h100-rail-optimized"], rel=0.01)
    a2a = {name: collective_seconds(load_cluster(name), Collective.ALL_TO_ALL, 8 * S, ranks)  # bandwidth-bound
           for name in ("dgx-h100", "h100-torus", "h100-dragonfly")}
    assert a2a["h100-torus"] > 2 * a2a["dgx-h100"]
    assert a2a["h100-dragonfly"] == pytest.approx(2 * a2a["dgx-h100"], rel=0.05)
    cross_rail = collective_seconds(load_cluster("h100-rail-only"), Collective.P2P, S, (0, 9))
    same_rail = collective_seconds(load_cluster("h100-rail-only"), Collective.P2P, S, (0, 8))
    assert cross_rail > same_rail
