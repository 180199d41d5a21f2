"""`megaloom info`: parameter count (formula and actual), FLOPs per token, memory estimate of a config."""

from __future__ import annotations

import dataclasses

from megaloom.config import Config
from megaloom.model import count_parameters
from megaloom.perf import flops, memory
from megaloom.perf.cluster import load_cluster
from megaloom.perf.costs import MEGALOOM, Job, StageCosts

GIB = 2**30


def info_report(cfg: Config, recompute: str | None = None) -> dict:
    """Parameters, FLOPs and the memory per GPU of `cfg`'s layout (recomputation: `recompute`, else the config's)."""
    m, t = cfg.model, cfg.train
    recompute = recompute or t.recompute
    l, h, a, s, V = m.layers, m.hidden, m.heads, m.seq_len, m.vocab_size
    actual = count_parameters(m)
    is_paper_arch = m.family == "gpt2" and m.ffn == 4 * h
    # one memory model for `info`, `simulate` and `plan`: the planner's, for megaloom's own program
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, recompute=recompute))
    job = Job.from_config(cfg, load_cluster("dgx-h100"))
    costs = StageCosts(job)
    state, act, total = costs.peak_memory()
    step_tokens = t.global_batch * s
    return {
        "model": {"family": m.family, "layers": l, "hidden": h, "heads": a, "kv_heads": m.n_kv_heads,
                  "ffn_hidden": m.ffn, "vocab_size": V, "seq_len": s},
        "parameters": {
            "actual_numel": actual,
            "formula": flops.parameters(m),
            # The paper's formula describes the GPT-2 architecture only (4h MLP, full attention).
            "paper_formula": round(flops.paper_parameters(l, h, V, s)) if is_paper_arch else None,
        },
        "flops": {
            "per_token_training": flops.model_flops_per_token(m),
            "per_token_forward": flops.forward_flops_per_token(m),
            "per_step_training": flops.model_flops_per_token(m) * step_tokens,
            "per_step_paper_formula": (flops.paper_flops_per_iteration(t.global_batch, s, l, h, V)
                                       if is_paper_arch else None),
            "global_batch_tokens": step_tokens,
        },
        "memory": {  # per GPU of the config's layout, the pipeline rank with the highest peak
            "micro_batch": t.micro_batch,
            "recompute": recompute,
            "state_bytes_per_parameter": memory.state_bytes_per_parameter(cfg.parallel.zero, cfg.parallel.dp,
                                                                          MEGALOOM.fp32_weights),
            "state_gib": state / GIB,
            "activations_per_layer_gib": costs.activation_bytes_per_layer() / GIB,
            "activations_gib": act / GIB,
            "total_gib": total / GIB,
        },
    }


def render_info(r: dict) -> str:
    m, p, f, mem = r["model"], r["parameters"], r["flops"], r["memory"]
    lines = [
        f"model        {m['family']}: l={m['layers']} h={m['hidden']} a={m['heads']} kv={m['kv_heads']} "
        f"ffn={m['ffn_hidden']} s={m['seq_len']} V={m['vocab_size']}",
        f"parameters   {p['actual_numel']:,}  actual numel of the model",
        f"             {p['formula']:,}  megaloom formula (megaloom/perf/flops.py: parameters)",
    ]
    if p["paper_formula"] is not None:
        diff = p["actual_numel"] - p["paper_formula"]
        lines.append(f"             {p['paper_formula']:,}  Megatron-LM paper 12lh²(1 + 13/(12h) + (V+s)/(12lh)); "
                     f"differs by {diff:,} = the final LayerNorm (2h)")
    lines += [
        f"FLOPs/token  {f['per_token_training'] / 1e9:,.3f} GFLOP training (forward + backward), "
        f"{f['per_token_forward'] / 1e9:,.3f} GFLOP forward",
        f"FLOPs/step   {f['per_step_training'] / 1e12:,.2f} TFLOP for {f['global_batch_tokens']:,} tokens"
        + (f" (paper: 72Bslh²(1 + s/(6h) + V/(12lh)) = {f['per_step_paper_formula'] / 1e12:,.2f} TFLOP)"
           if f["per_step_paper_formula"] else ""),
        f"memory       {mem['state_gib']:,.2f} GiB weights + gradients + Adam state "
        f"({mem['state_bytes_per_parameter']:g} B/parameter)",
        f"             {mem['activations_gib']:,.2f} GiB activations at micro-batch {mem['micro_batch']}, "
        f"recompute={mem['recompute']} ({mem['activations_per_layer_gib']:,.3f} GiB per layer and micro-batch)",
        f"             {mem['total_gib']:,.2f} GiB peak per GPU, before fragmentation and workspace (the planner's "
        f"model of megaloom's program, as `megaloom simulate --config ... --recipe megaloom`)",
    ]
    return "\n".join(lines)
