"""Search every layout of a model on a cluster and rank them by predicted throughput.

For a model, a GPU count n and a global batch B the planner enumerates every valid
(t, p, d, v, b, recompute, sequence parallelism, ZeRO) with t·p·d = n (the conditions of
`costs.check_job`), computes each one's memory first (cheap) and drops what does not fit, estimates
the step time of the rest in closed form, then runs the event-driven simulator on the best few and
ranks those by its step time.

The closed form is the simulator's cost model with the schedule replaced by its steady state: with
F_r, B_r a rank's forward and backward time per microbatch (all its chunks), c the p2p time,

    pipeline = m · max_r (F_r + B_r) + (p - 1) · (mean_r (F_r + B_r) / v + 2c)

which is §2.2's (m + p - 1)·(t_f + t_b) for 1F1B and (m + (p-1)/v)·(t_f + t_b) interleaved, plus the
gradient reduction, optimizer and ZeRO tails of `simulator.finish_step`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaloom.config import ConfigError, ModelConfig
from megaloom.perf.cluster import Cluster
from megaloom.perf.costs import GIB, MEGATRON, RECOMPUTE, USABLE_MEMORY, Job, Layout, Recipe, StageCosts, peak_in_flight
from megaloom.perf.simulator import Simulation, finish_step, pass_seconds, simulate_job
from megaloom.perf.traffic import global_sync_seconds, p2p_seconds

FIELDS = ("tp", "pp", "microbatch", "chunks", "recompute", "zero", "sequence_parallel")


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    step_time: float
    memory: float  # bytes, the busiest GPU
    breakdown: dict


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(model: ModelConfig, gpus: int, global_batch: int, fixed: dict | None = None,
            recomputes: list[str] | tuple[str, ...] = RECOMPUTE):
    """Every valid layout, b ascending within each (t, p, v, recompute, zero, sp) so a caller can stop at
    the first microbatch that does not fit."""
    fixed = fixed or {}

    def allowed(name: str, values):  # noqa: ANN001, ANN202
        return [x for x in values if name not in fixed or fixed[name] == x]

    for t in allowed("tp", divisors(gpus)):
        if model.heads % t or model.n_kv_heads % t:
            continue
        for p in allowed("pp", divisors(gpus // t)):
            if model.layers % p:
                continue
            d = gpus // (t * p)
            if global_batch % d or fixed.get("dp", d) != d:
                continue
            for v in allowed("chunks", [x for x in divisors(model.layers // p) if x == 1 or p > 1]):
                for rc in allowed("recompute", list(recomputes)):
                    for zero in allowed("zero", [0, 1] if p > 1 else [0, 1, 2, 3]):
                        if zero and d == 1:
                            continue
                        for sp in allowed("sequence_parallel", [False, True] if t > 1 else [False]):
                            if sp and model.seq_len % t:
                                continue
                            group = []
                            for b in allowed("microbatch", divisors(global_batch // d)):
                                m = global_batch // (b * d)
                                if v > 1 and m % p:
                                    continue
                                group.append(Layout(t, p, d, b, v, rc, zero, sp))
                            if group:
                                yield group


class Planner:
    def __init__(self, model: ModelConfig, cluster: Cluster, gpus: int, global_batch: int,
                 recipe: Recipe = MEGATRON) -> None:
        self.model, self.cluster, self.gpus, self.global_batch, self.recipe = model, cluster, gpus, global_batch, recipe
        self._layer_costs: dict[tuple, StageCosts] = {}

    def job(self, layout: Layout) -> Job:
        return Job(self.model, self.cluster, self.gpus, self.global_batch, layout, self.recipe)

    def _shared(self, lay: Layout) -> StageCosts:
        """Layer, embedding and head times depend on (t, b, recompute, sp, zero) only: computed once."""
        key = (lay.tp, lay.microbatch, lay.recompute, lay.sequence_parallel)
        if key not in self._layer_costs:
            self._layer_costs[key] = StageCosts(self.job(Layout(lay.tp, 1, self.gpus // lay.tp, lay.microbatch, 1,
                                                                lay.recompute, 0, lay.sequence_parallel)))
        return self._layer_costs[key]

    def memory(self, lay: Layout) -> float:
        job = self.job(lay)
        costs = StageCosts(job)
        m = job.microbatches
        kind = lay.schedule_kind
        return max(costs.memory_bytes(r, peak_in_flight(kind, lay.pp, m, lay.chunks, r))[2]
                   for r in {0, lay.pp - 1})

    def estimate(self, lay: Layout) -> Estimate:
        job = self.job(lay)
        shared = self._shared(lay)
        costs = StageCosts(job)
        costs.__dict__.update(layer=shared.layer, embedding=shared.embedding, head=shared.head)
        p, v, m = lay.pp, lay.chunks, job.microbatches
        per_rank = []
        for r in range(p) if p <= 2 else (0, 1, p - 1):  # inner ranks are all alike
            f = sum(pass_seconds(job, costs, r + c * p, 0) for c in range(v))  # ZeRO-2/3 gathers included
            b = sum(pass_seconds(job, costs, r + c * p, 1) for c in range(v))
            per_rank.append((r, f, b))
        heaviest = max(f + b for _, f, b in per_rank)
        mean = (sum(f + b for _, f, b in per_rank) + (p - len(per_rank)) * (per_rank[1][1] + per_rank[1][2]
                                                                            if p > 2 else 0)) / p
        c = p2p_seconds(job, 0, 1) if p > 1 else 0.0
        pipeline = m * heaviest + (p - 1) * (mean / v + 2 * c)
        if not self.recipe.overlap_p2p:  # Megatron-LM 2021 waits for one batch per forward-backward pair
            pipeline += m * v * c
        tail, exposed, opt = 0.0, 0.0, 0.0
        for r, _, b in per_rank:
            chunk_b = b / v
            last = [(pipeline - (k + 1) * chunk_b, pipeline - k * chunk_b) for k in range(v)]
            end, e, o = finish_step(job, costs, r, pipeline, last)
            if end - pipeline > tail:
                tail, exposed, opt = end - pipeline, e, o
        step = pipeline + tail + global_sync_seconds(job)
        tp = m * sum(costs.chunk(s).tp_comm for s in range(p * v)) / p
        breakdown = {"compute": m * heaviest - tp, "tp_comm": tp, "pp_p2p_exposed": (p - 1) * 2 * c,
                     "pipeline_bubble": pipeline - m * heaviest - (p - 1) * 2 * c,
                     "dp_comm_exposed": exposed, "optimizer": opt}
        return Estimate(lay, step, self.memory(lay), breakdown)

    def search(self, fixed: dict | None = None, top: int = 5, simulate: int | None = None) -> list[Simulation]:
        """The `top` fastest layouts that fit, simulated and ranked by simulated step time."""
        capacity = self.cluster.device.memory_gib * GIB * USABLE_MEMORY
        ranked: list[Estimate] = []
        fixed = dict(fixed or {})
        if not self.recipe.sequence_parallel:  # what the modelled program cannot do is not searched
            fixed.setdefault("sequence_parallel", False)
        if not self.recipe.zero:
            fixed.setdefault("zero", 0)
        for group in layouts(self.model, self.gpus, self.global_batch, fixed,
                             recomputes=[r for r in RECOMPUTE if r != "selective" or self.recipe.selective_recompute]):
            for lay in group:
                if self.memory(lay) > capacity:
                    break  # a larger microbatch needs more memory still
                ranked.append(self.estimate(lay))
        if not ranked:
            raise ConfigError(f"no layout of this model fits in {self.cluster.device.memory_gib:g} GB per GPU on "
                              f"{self.gpus} GPUs with --global-batch {self.global_batch}"
                              + (f" and the fixed {fixed}" if fixed else "")
                              + "; add GPUs, relax the fixed flags, or allow --recompute full")
        ranked.sort(key=lambda e: e.step_time)
        sims = [simulate_job(self.job(e.layout)) for e in ranked[:simulate or top]]
        sims.sort(key=lambda s: s.step_time)
        self.considered = len(ranked)
        self.estimates = ranked
        return sims[:top]


STEP_PARTS = {"compute": "compute", "tp_comm": "tp collectives", "pp_p2p_exposed": "exposed pp p2p",
              "pipeline_bubble": "bubble", "zero_gather_exposed": "exposed ZeRO gathers",
              "dp_comm_exposed": "exposed dp reduction", "optimizer": "optimizer",
              "global_sync": "embedding sum and scalars"}


def explain(sims: list[Simulation]) -> list[str]:
    """Plain words: why the winner beats each runner-up."""
    if not sims:
        return []
    best = sims[0]
    lines = [f"#1 {best.job.layout}: {best.step_time:.3f} s per step, "
             f"{best.report()['model_tflops_per_gpu']:.0f} TFLOP/s per GPU (MFU {best.report()['mfu']:.1%}), "
             f"{best.memory_per_gpu / GIB:.1f} GiB per GPU",
             "   its step: " + ", ".join(f"{STEP_PARTS[k]} {v:.3f} s ({v / best.step_time:.0%})"
                                         for k, v in best.breakdown.items() if k in STEP_PARTS)]
    for i, other in enumerate(sims[1:], start=2):
        diff = [f"{name}={getattr(other.job.layout, name)} (not {getattr(best.job.layout, name)})" for name in FIELDS
                if getattr(other.job.layout, name) != getattr(best.job.layout, name)]
        slower = other.step_time / best.step_time - 1
        deltas = {k: other.breakdown[k] - best.breakdown.get(k, 0.0) for k in other.breakdown}
        worst = max(deltas, key=deltas.get)
        why = (f"its {worst.replace('_', ' ')} takes {other.breakdown[worst]:.3f} s against "
               f"{best.breakdown[worst]:.3f} s" if deltas[worst] > 0 else "it is within noise of the winner")
        lines.append(f"#{i} differs in {', '.join(diff) or 'nothing'}: {slower:.1%} slower, because {why}"
                     f"; memory {other.memory_per_gpu / GIB:.1f} GiB")
    return lines


def takeaway_layouts(model: ModelConfig, cluster: Cluster, gpus: int, global_batch: int, **fixed) -> Simulation:
    """The best layout under some fixed fields: a helper for tests and docs."""
    return Planner(model, cluster, gpus, global_batch).search(fixed, top=1)[0]

