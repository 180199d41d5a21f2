"""Where a job's bytes go: which GPUs a pipeline stage and its data-parallel group are, how long one
microbatch's activations take between stages, the step-wide scalars, and the bytes each GPU sends per
step by group (tp, pp, dp), counted as megaloom's runtime issues them. The simulator puts these on its
timeline (megaloom/perf/simulator.py)."""

from __future__ import annotations

from megaloom.layout import vocab_rows
from megaloom.perf.collectives import Collective, collective_seconds
from megaloom.perf.costs import Job, StageCosts


def stage_rank(job: Job, pp_rank: int) -> int:
    """Global rank of the (tp 0, dp 0) GPU of a pipeline stage (grid.py: rank = pp·dp·tp + dp·tp + tp)."""
    lay = job.layout
    return pp_rank * lay.dp * lay.tp


def p2p_seconds(job: Job, src_pp: int, dst_pp: int) -> float:
    """One microbatch's activations (or gradients), b·s·h bf16 values, from one stage to the next."""
    lay, m, c = job.layout, job.model, job.cluster
    size = lay.microbatch * m.seq_len * m.hidden * 2.0
    a, b = stage_rank(job, src_pp), stage_rank(job, dst_pp)
    if lay.tp == 1:
        return collective_seconds(c, Collective.P2P, size, (a, b))
    # scatter/gather (§4.1): each tp rank sends its 1/t slice on its own link; the receivers all-gather it
    # over NVLink. With sequence parallelism the activations are already split along the sequence.
    send = collective_seconds(c, Collective.P2P, size / lay.tp, (a, b))
    if lay.sequence_parallel:
        return send
    return send + collective_seconds(c, Collective.ALL_GATHER, size, tuple(range(b, b + lay.tp)))


def dp_group(job: Job, pp_rank: int) -> tuple[int, ...]:
    """The data-parallel group of a stage's tp-rank-0 GPU: every tp-th rank (grid.group_of, tested equal)."""
    lay = job.layout
    first = stage_rank(job, pp_rank)
    return tuple(range(first, first + lay.dp * lay.tp, lay.tp))


def global_sync_seconds(job: Job) -> float:
    """Step-wide scalars (gradient norm, loss) and the tied embedding's gradient between first and last stage."""
    c, lay, m = job.cluster, job.layout, job.model
    t = 2 * collective_seconds(c, Collective.ALL_REDUCE, 8.0, tuple(range(0, job.gpus, max(1, job.gpus // 8))))
    if m.family == "gpt2" and lay.pp > 1:
        t += collective_seconds(c, Collective.ALL_REDUCE, vocab_rows(m.vocab_size, lay.tp) * m.hidden * 4,
                                (stage_rank(job, 0), stage_rank(job, lay.pp - 1)))
    return t


def communication_by_stage(job: Job, costs: StageCosts) -> list[dict[str, float]]:
    """Bytes one GPU (tp rank 0, dp rank 0) of each pipeline rank sends per step, by the group that
    carries them, counted operation by operation as megaloom's runtime issues them (its counters,
    `comm_bytes` in metrics.jsonl, are tested equal: tests/distributed/test_comm_bytes.py). A ring
    all-reduce of n bytes sends 2(g-1)/g·n per rank, an all-gather or reduce-scatter (g-1)/g·n of the
    full tensor, a point-to-point send its own n.

    - tp: per layer and microbatch the two `g` all-reduces of forward and the two `f` of backward
      (§3.2 of Narayanan et al.: 8·b·s·h·(t-1)/t values), two more under full recomputation; `g`
      carries the activation dtype (the row-parallel GEMM's output), `f` the residual stream's (its
      input is the LayerNorm's output: fp32 in megaloom's program, bf16 in Megatron's); sequence
      parallelism turns each into a reduce-scatter plus an all-gather, the same bytes (Korthikanti
      et al. §4.2.2). The vocab-parallel embedding reduces its output
      (residual dtype; under sequence parallelism a reduce-scatter, and an all-gather of its
      gradient); the head's input gradient is reduced (or, under sequence parallelism, its input
      gathered and its gradient scattered); the vocab-parallel loss reduces three fp32 numbers per
      token (max, sum of exponentials, target logit). Scatter/gather (§4.1): a stage rebuilds every tensor it
      receives with an all-gather over tp. Per step: the norm's sum of squares, and under sequence
      parallelism the sum of the partial gradients of the parameters every tp rank holds whole.
    - pp: b·s·h per microbatch across each stage boundary, forward activations and backward
      gradients, b·s·h/t per GPU when t > 1 (scatter/gather, or already split by sequence
      parallelism), v times under interleaving (§2.2.2), in the activation dtype; the tied GPT-2
      embedding's gradient summed between the first and last stage; the norm over stages.
    - dp: ZeRO-0 all-reduces the gradients; ZeRO-1 reduce-scatters them and all-gathers the updated
      weights; ZeRO-2/3 (FSDP2) gather the weights in the compute dtype for every microbatch (ZeRO-3
      twice, forward and backward: `reshard_after_forward=True` on every unit, the root included)
      and reduce-scatter the accumulated gradients once per step; the sharded norm adds two floats.
    """
    lay, m = job.layout, job.model
    t, p, d, v, mb = lay.tp, lay.pp, lay.dp, lay.chunks, job.microbatches
    act, resid = job.activation_bytes, job.residual_bytes
    grad = 2 if job.grad_reduce_dtype == "bf16" else 4
    bsh, tokens = lay.microbatch * m.seq_len * m.hidden, lay.microbatch * m.seq_len
    last = p * v - 1
    ar_t, half_t = 2 * (t - 1) / t, (t - 1) / t
    out = []
    for r in range(p):
        stages = [c * p + r for c in range(v)]
        layers = sum(costs.rank_layers(r))
        sends = sum((s != last) + (s != 0) for s in stages) * mb  # = receives
        split, whole = costs.rank_split(r)
        params = split / t + whole
        sharded = d if lay.zero >= 2 else 1  # FSDP: each rank reduces its own shard of a gradient
        tp = 0.0
        if t > 1:
            # the `f` collectives (in front of the column-parallel GEMMs) carry the residual stream's
            # dtype both ways, the `g` ones (behind the row-parallel GEMMs) the activation dtype
            per_layer = 2 * ar_t * bsh * (resid + act)
            if lay.recompute == "full":  # the forward again: g's all-reduces; under SP f's gathers too
                per_layer += ar_t * bsh * (resid + act) if lay.sequence_parallel else 2 * ar_t * bsh * act
            tp += per_layer * layers * mb
            if 0 in stages:
                tp += (2 * half_t if lay.sequence_parallel else ar_t) * bsh * resid * mb
            if last in stages:
                tp += (2 * half_t if lay.sequence_parallel else ar_t) * bsh * resid * mb
                tp += 3 * ar_t * tokens * 4 * mb
            if not lay.sequence_parallel and p > 1:
                tp += sends * half_t * bsh * act
            tp += ar_t * 4
            if lay.sequence_parallel:
                tp += ar_t * whole * 4 / sharded
        pp = 0.0
        if p > 1:
            pp += sends * bsh / t * act
            if m.tied and (0 in stages or last in stages):
                pp += vocab_rows(m.vocab_size, t) * m.hidden * 4 / sharded
            pp += 2 * (p - 1) / p * 4
        dp = 0.0
        if d > 1:
            ring = (d - 1) / d
            if lay.zero == 0:
                dp = 2 * ring * params * grad
            elif lay.zero == 1:
                dp = ring * params * grad + ring * params * (4 if job.recipe.fp32_weights else 2)
            else:
                weights = 4 if job.precision == "fp32" else 2
                gathered = 2 * params if lay.zero == 3 else params
                dp = ring * gathered * weights * mb + ring * params * grad
            if lay.zero >= 1:
                dp += 2 * ring * 8
        out.append({"tp": tp, "pp": pp, "dp": dp})
    return out
