"""Every constant of the planner's hardware, network and efficiency models has a recorded source
(megaloom/perf/sources.py); the ones still assumed are listed here by name, so a new unsourced
constant fails this test and a sourced one must leave the list."""

import dataclasses
import inspect
import numbers
import re

from megaloom.perf import costs, hardware, simulator, sources
from megaloom.perf.cluster import Cluster

# not model constants: units, names, switches of the search
NOT_CONSTANTS = {"costs.GIB", "costs.RECOMPUTE", "costs.RECIPES", "hardware.OVERHEADS"}

STILL_ASSUMED = [
    "cluster.hop_latency_us", "cluster.intra_efficiency", "cluster.nic_efficiency",
    "costs.USABLE_MEMORY",
    "hardware.K_OVERHEAD", "hardware.LAUNCH_SECONDS", "hardware.TILES",
]


def _module_constants():
    for module in (hardware, costs, simulator):
        short = module.__name__.rsplit(".", 1)[1]
        defined = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*[:=]", inspect.getsource(module), re.M))  # not imported
        for name, value in vars(module).items():
            if name in defined and f"{short}.{name}" not in NOT_CONSTANTS:
                if isinstance(value, (numbers.Number, tuple, dict, costs.Recipe)):
                    yield f"{short}.{name}"


def _cluster_defaults():
    for f in dataclasses.fields(Cluster):
        if isinstance(f.default, numbers.Number) and not isinstance(f.default, bool):
            yield f"cluster.{f.name}"


def test_every_constant_has_a_source():
    names = set(_module_constants()) | set(_cluster_defaults())
    assert {"hardware.K_OVERHEAD", "costs.USABLE_MEMORY", "cluster.nic_efficiency"} <= names  # the walk finds them
    missing = sorted(names - set(sources.SOURCES))
    assert not missing, f"constants without a source in megaloom/perf/sources.py: {missing}"
    for name, (kind, text) in sources.SOURCES.items():
        assert kind in sources.KINDS and len(text) > 10, name


def test_the_assumed_constants_are_these():
    assert sources.assumed() == STILL_ASSUMED
