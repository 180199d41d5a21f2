"""One validator: config loading, `megaloom simulate` and `megaloom plan` accept and refuse the same
layouts (megaloom/layout.py), each naming the setting as its user spells it."""

from dataclasses import replace

import pytest

from megaloom.config import ConfigError, ModelConfig, load_config
from megaloom.perf.costs import Layout, check_job

BASE = ["model.layers=4", "model.hidden=32", "model.heads=4", "model.vocab_size=64", "model.seq_len=16",
        "train.global_batch=8", "train.micro_batch=1", "data.vocab_size=64"]


def _config(**p):
    return load_config(None, BASE + [f"parallel.{k}={v!r}" if isinstance(v, str) else f"parallel.{k}={str(v).lower()}"
                                     for k, v in p.items()])


def _plan(cfg):
    p, t = cfg.parallel, cfg.train
    lay = Layout(p.tp, p.pp, p.dp, t.micro_batch, p.chunks, "none", p.zero, p.sequence_parallel, p.schedule,
                 tuple(p.layers_per_stage))
    check_job(cfg.model, p.tp * p.pp * p.dp, t.global_batch, lay)


CASES = [  # (parallel settings, part of the config's message or None when accepted)
    (dict(tp=3), "parallel.tp (3) must divide model.heads (4)"),  # was only checked at launch
    (dict(tp=2, pp=2, dp=2), None),
    (dict(pp=3), "model.layers (4) is not divisible by parallel.pp x parallel.chunks (3)"),
    (dict(pp=3, layers_per_stage=[2, 1, 1]), None),  # uneven: the runtime runs it, so the planner models it
    (dict(pp=2, zero=2, dp=2), None),  # ZeRO-2 with pipelining runs, so the planner takes it
    (dict(pp=2, dp=2, zero=3, schedule="zb-h1"), 'parallel.schedule = "zb-h1" defers the weight gradients'),
    (dict(pp=2, dp=2, zero=1, schedule="zb-h1"), None),
    (dict(pp=2, chunks=2, schedule="interleaved", dp=8), "needs microbatches (1) to be a multiple of parallel.pp"),
    (dict(tp=2, sequence_parallel=True), None),
]


@pytest.mark.parametrize("settings, message", CASES)
def test_config_and_planner_agree(settings, message):
    if message is None:
        cfg = _config(**settings)
        _plan(cfg)  # the planner takes what the config takes
        return
    with pytest.raises(ConfigError) as e:
        _config(**settings)
    assert message in str(e.value) and "\n" not in str(e.value)
    flags = {k: v for k, v in settings.items() if k != "layers_per_stage"}
    cfg_ok = load_config(None, BASE)  # the same layout given to the planner directly is refused too
    p = dict(tp=1, pp=1, dp=1, chunks=1, zero=0, schedule="", sequence_parallel=False) | flags
    lay = Layout(p["tp"], p["pp"], p["dp"], 1, p["chunks"], "none", p["zero"], p["sequence_parallel"], p["schedule"],
                 tuple(settings.get("layers_per_stage", ())))
    with pytest.raises(ConfigError) as e2:
        check_job(cfg_ok.model, p["tp"] * p["pp"] * p["dp"], cfg_ok.train.global_batch, lay)
    assert "--" in str(e2.value)  # the planner names its flags


def test_a_vocabulary_tp_does_not_divide_is_padded_not_refused():
    """Config and planner take V = 61 at t = 2 and 4 (ceil(V/t) rows a rank, the last padded) and count the
    padded rows in the memory; both refuse a t that would leave the last rank padding alone."""
    from megaloom.perf.cluster import load_cluster
    from megaloom.perf.costs import Job, StageCosts

    for tp in (2, 4):
        cfg = load_config(None, BASE + ["model.vocab_size=61", "data.vocab_size=61", f"parallel.tp={tp}"])
        _plan(cfg)
        rows = StageCosts(Job(cfg.model, load_cluster("dgx-a100"), tp, 8, Layout(tp=tp, microbatch=1)))
        even = replace(cfg.model, vocab_size=64 if tp == 4 else 62)  # the padded vocabulary
        rows_even = StageCosts(Job(even, load_cluster("dgx-a100"), tp, 8, Layout(tp=tp, microbatch=1)))
        assert rows.rank_parameters(0) == rows_even.rank_parameters(0)
    small = BASE + ["model.vocab_size=6", "data.vocab_size=6", "parallel.tp=4"]
    with pytest.raises(ConfigError, match=r"parallel.tp \(4\) splits model.vocab_size \(6\) into 2 rows per rank"):
        load_config(None, small)
    cfg_ok = load_config(None, BASE)
    with pytest.raises(ConfigError, match=r"--tp \(4\) splits --vocab \(6\)"):
        check_job(replace(cfg_ok.model, vocab_size=6), 4, 8, Layout(tp=4, microbatch=1))


def test_uneven_stages_change_the_simulated_memory():
    from megaloom.perf.cluster import load_cluster
    from megaloom.perf.costs import Job, StageCosts

    m = ModelConfig(family="gpt2", layers=6, hidden=256, heads=4, vocab_size=512, seq_len=64)
    even = Job(m, load_cluster("dgx-a100"), 2, 8, Layout(pp=2, microbatch=1))
    uneven = Job(m, load_cluster("dgx-a100"), 2, 8, Layout(pp=2, microbatch=1, layers_per_stage=(4, 2)))
    assert StageCosts(uneven).rank_layers(0) == [4] and StageCosts(even).rank_layers(0) == [3]
    assert StageCosts(uneven).rank_parameters(0) > StageCosts(even).rank_parameters(0)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b", "interleaved", "zb-h1"])
def test_the_planner_counts_in_flight_on_the_schedules_lists(kind):
    """One counter: the planner's in-flight count is `schedules.in_flight` of the schedule itself (on
    at most 2·p·v micro-batches past which the count is steady: checked exact here)."""
    from megaloom.parallel.schedules import build_schedule, in_flight
    from megaloom.perf.costs import ScheduleKind, peak_in_flight

    for p in (2, 3, 4, 8):
        for v in ((1, 2, 3) if kind == "interleaved" else (1,)):
            for m in range(p, 8 * p * v + 1, p):
                counts = in_flight(build_schedule(kind, p, m, v))
                assert [peak_in_flight(ScheduleKind(kind), p, m, v, r) for r in range(p)] == list(counts), (p, v, m)
