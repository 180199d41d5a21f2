"""`megaloom simulate` and `megaloom plan`: flags and their handlers (registered in megaloom/cli.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megaloom.config import Config, ConfigError, ModelConfig, load_config
from megaloom.perf.cluster import load_cluster
from megaloom.perf.costs import GIB, RECIPES, RECOMPUTE, Job, Layout


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a config file, or its shape)")
    g.add_argument("--config", metavar="FILE", help="TOML config: its [model] (and train.global_batch, "
                   "train.precision) are used; a model flag given beside it overrides the file's value")
    g.add_argument("--family", choices=["gpt2", "llama"])
    g.add_argument("--layers", type=int, metavar="L")
    g.add_argument("--hidden", type=int, metavar="H")
    g.add_argument("--heads", type=int, metavar="A")
    g.add_argument("--vocab", type=int, metavar="V")
    g.add_argument("--seq", type=int, metavar="S")
    g.add_argument("--ffn", type=int, metavar="F", help="MLP width (default 4h for gpt2, ~8h/3 for llama)")
    g.add_argument("--kv-heads", type=int, metavar="K", help="key/value heads (llama grouped-query attention)")
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", default="dgx-h100", metavar="NAME_OR_FILE",
                   help="preset (dgx-a100, dgx-h100, ...) or a TOML file; default dgx-h100")
    g.add_argument("--gpus", type=int, required=True, metavar="N")
    g.add_argument("--sharp", action="store_true", help="turn in-network reduction (SHARP) on")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="megatron",
                   help="the training program modelled: megatron (fused kernels, flash attention; default), "
                        "megatron-2021 (scores materialized, as in the paper), eager (plain PyTorch autocast)")
    p.add_argument("--global-batch", type=int, metavar="B", help="sequences per step (default: train.global_batch "
                   "of --config)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="activation and gather dtype (default: train.precision of --config, else bf16)")


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    g = p.add_argument_group("layout (d = gpus / (tp·pp); with --config each defaults to the file's parallel.* "
                             "and train.micro_batch / train.recompute, else to 1, none, ZeRO 0)")
    g.add_argument("--tp", type=int, metavar="T")
    g.add_argument("--pp", type=int, metavar="P")
    g.add_argument("--microbatch", type=int, metavar="b")
    g.add_argument("--chunks", type=int, metavar="v", help="model chunks per rank (interleaved 1F1B)")
    g.add_argument("--recompute", choices=RECOMPUTE)
    g.add_argument("--zero", type=int, choices=[0, 1, 2, 3])
    g.add_argument("--sequence-parallel", action="store_true", default=None)
    g.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved", "zb-h1"],
                   help="pipeline schedule (default 1f1b, interleaved when --chunks > 1; with --config the file's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", metavar="PNG", help="draw the simulated pipeline to this PNG")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    g = p.add_argument_group("fixed constraints (any subset; the rest is searched)")
    g.add_argument("--tp", type=int, metavar="T")
    g.add_argument("--pp", type=int, metavar="P")
    g.add_argument("--microbatch", type=int, metavar="b")
    g.add_argument("--chunks", type=int, metavar="v")
    g.add_argument("--recompute", choices=RECOMPUTE)
    g.add_argument("--zero", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many layouts to print (default 5)")
    p.add_argument("--json", action="store_true", help="print a JSON list of the K best")


_MODEL_FLAGS = {"family": "family", "layers": "layers", "hidden": "hidden", "heads": "heads", "vocab": "vocab_size",
                "seq": "seq_len", "ffn": "ffn_hidden", "kv_heads": "kv_heads"}


def model_from_args(args: argparse.Namespace) -> tuple[ModelConfig, Config | None]:
    """The model of --config with any model flag given beside it applied over the file's value (and
    that config, read once), or the model the flags alone describe (and None)."""
    given = {key: getattr(args, flag) for flag, key in _MODEL_FLAGS.items() if getattr(args, flag) is not None}
    if args.config:
        cfg = load_config(args.config, [f"model.{k}={v if isinstance(v, int) else repr(v)}" for k, v in given.items()])
        m = cfg.model
    else:
        missing = [f"--{n}" for n in ("layers", "hidden", "heads", "vocab", "seq") if getattr(args, n) is None]
        if missing:
            raise ConfigError(f"the model needs {', '.join(missing)} (or --config FILE), e.g. --layers 24 --hidden 2048 "
                              f"--heads 16 --vocab 50304 --seq 2048")
        m, cfg = ModelConfig(**{"family": "gpt2", **given}), None
    for name, value in (("--layers", m.layers), ("--hidden", m.hidden), ("--heads", m.heads), ("--vocab", m.vocab_size),
                        ("--seq", m.seq_len)):
        if value < 1:
            raise ConfigError(f"{name} ({value}) must be >= 1")
    if m.hidden % m.heads:
        raise ConfigError(f"--hidden ({m.hidden}) must be a multiple of --heads ({m.heads})")
    if m.heads % m.n_kv_heads:
        raise ConfigError(f"--heads ({m.heads}) must be a multiple of --kv-heads ({m.n_kv_heads})")
    if m.kv_heads and m.family != "llama":
        raise ConfigError("--kv-heads needs --family llama (grouped-query attention)")
    return m, cfg


def simulate_config(cfg: Config, gpus: int, cluster: str = "dgx-h100") -> dict:
    """`megaloom simulate`'s report for a training config as megaloom runs it: its model, layout
    (parallel.*, train.micro_batch, train.recompute), precision and megaloom's own program (the eager
    recipe: fp32 weights under autocast)."""
    from megaloom.perf.simulator import simulate_job

    job = Job.from_config(cfg, load_cluster(cluster), gpus)
    return simulate_job(job).report()


def _setup(args: argparse.Namespace):  # noqa: ANN202
    model, cfg = model_from_args(args)
    cluster = load_cluster(args.cluster, **({"sharp": True} if args.sharp else {}))
    batch = args.global_batch or (cfg.train.global_batch if cfg else None)
    if not batch:
        raise ConfigError("--global-batch is required (sequences per optimizer step), e.g. --global-batch 512")
    if args.gpus < 1:
        raise ConfigError(f"--gpus ({args.gpus}) must be >= 1")
    return model, cluster, batch, RECIPES[args.recipe], cfg


def _layout_flags(args: argparse.Namespace, cfg: Config | None) -> dict:
    """The layout `simulate` models: each flag given, else the --config file's value (parallel.*,
    train.micro_batch, train.recompute), else tp = pp = b = v = 1, no recomputation, ZeRO 0, the default schedule."""
    if cfg is None:
        base = {"tp": 1, "pp": 1, "microbatch": 1, "chunks": 1, "recompute": "none", "zero": 0,
                "sequence_parallel": False, "schedule": ""}
    else:
        par = cfg.parallel
        base = {"tp": par.tp, "pp": par.pp, "microbatch": cfg.train.micro_batch, "chunks": par.chunks,
                "recompute": cfg.train.recompute, "zero": par.zero, "sequence_parallel": par.sequence_parallel,
                "schedule": "" if par.schedule == "1f1b" else par.schedule}  # "": 1f1b, interleaved when v > 1
    return {k: v if getattr(args, k) is None else getattr(args, k) for k, v in base.items()}


def simulate_command(args: argparse.Namespace) -> int:
    from megaloom.perf.simulator import simulate_job

    model, cluster, batch, recipe, cfg = _setup(args)
    f = _layout_flags(args, cfg)
    tp, pp = f["tp"], f["pp"]
    if args.gpus % (tp * pp):
        raise ConfigError(f"--gpus ({args.gpus}) must be a multiple of --tp x --pp ({tp} x {pp} = "
                          f"{tp * pp}), since d = gpus / (tp·pp)")
    split = tuple(cfg.parallel.layers_per_stage) if cfg else ()
    if len(split) != pp * f["chunks"]:  # the file's uneven split is for its own pp x chunks
        split = ()
    layout = Layout(tp, pp, args.gpus // (tp * pp), f["microbatch"], f["chunks"], f["recompute"], f["zero"],
                    f["sequence_parallel"], f["schedule"], split)
    precision = args.precision or (cfg.train.precision if cfg else "bf16")
    sim = simulate_job(Job(model, cluster, args.gpus, batch, layout, recipe, precision))
    report = sim.report()
    if args.timeline:
        from megaloom.observe.timeline import draw_timeline

        title = f"{cluster.name}, {args.gpus} GPUs, {layout}: step {sim.step_time:.3f} s"
        report["timeline"] = str(draw_timeline(sim.schedule_sim, Path(args.timeline), title))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from megaloom.perf.planner import Planner, explain

    model, cluster, batch, recipe, _ = _setup(args)
    if args.top < 1:
        raise ConfigError(f"--top ({args.top}) must be >= 1")
    fixed = {k: getattr(args, k) for k in ("tp", "pp", "microbatch", "chunks", "recompute", "zero")
             if getattr(args, k) is not None}
    planner = Planner(model, cluster, args.gpus, batch, recipe)
    sims = planner.search(fixed, top=args.top)
    if args.json:
        print(json.dumps([s.report() for s in sims], indent=2))
        return 0
    print(f"{cluster.describe()}; {args.gpus} GPUs, global batch {batch}: {planner.considered} layouts fit, "
          f"the best {len(sims)} simulated")
    for i, s in enumerate(sims, start=1):
        print(f"{i:>2}. {render(s.report(), short=True)}")
    print("\n".join(explain(sims)))
    return 0


def render(r: dict, short: bool = False) -> str:
    lay = (f"tp={r['tp']} pp={r['pp']} dp={r['dp']} b={r['microbatch']} v={r['chunks']} recompute={r['recompute']} "
           f"zero={r['zero']}{' sp' if r['sequence_parallel'] else ''}")
    head = (f"{lay}: {r['step_time_s']:.4g} s/step, {r['tokens_per_s']:,.0f} tokens/s, "
            f"{r['model_tflops_per_gpu']:.1f} model TFLOP/s/GPU (MFU {r['mfu']:.1%}, HFU {r['hfu']:.1%}), "
            f"bubble {r['bubble_fraction']:.1%}, {r['memory_per_gpu_gib']:.1f} GiB/GPU"
            f"{'' if r['fits'] else ' (DOES NOT FIT)'}")
    if short:
        return head
    t, c = r["time_breakdown_s"], r["comm_bytes_per_gpu"]
    return "\n".join([
        f"{r['cluster']} ({r['gpus']}x {r['gpu']}), global batch {r['global_batch']} = {r['microbatches']} "
        f"microbatches x {r['microbatch']} x dp {r['dp']}, recipe {r['recipe']}, schedule {r['schedule']}",
        head,
        "time      " + ", ".join(f"{k.replace('_', ' ')} {v:.4g} s" for k, v in t.items()),
        f"memory    {r['memory_state_gib']:.1f} GiB model state + {r['memory_activations_gib']:.1f} GiB activations "
        f"(peak {r['memory_per_gpu_gib']:.1f} of {r['memory_capacity_gib']:g} GB)",
        "traffic   " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in c.items()) + " per GPU per step",
    ])


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="TOML", help="cluster file to write (then: --cluster TOML)")
    p.add_argument("--config", metavar="FILE", help="model whose GEMM shapes to measure (default configs/debug.toml "
                   "built in: the default model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed repetitions per figure (median)")


def calibrate_command(args: argparse.Namespace) -> int:
    """Measure this machine (under torchrun: and its links) and write a cluster file."""
    import os

    import torch.distributed as dist

    from megaloom.perf.calibrate import calibrate

    if args.repeats < 1:
        raise ConfigError(f"--repeats ({args.repeats}) must be >= 1")
    cfg = load_config(args.config, args.set)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: directory {out.parent} does not exist")
    if world > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    command = " ".join(["megaloom calibrate --out", args.out, *(["--config", args.config] if args.config else []),
                        *(f"--set {x}" for x in args.set), f"--repeats {args.repeats}"])
    measured = calibrate(out, cfg, command, args.repeats)
    if not dist.is_initialized() or dist.get_rank() == 0:
        links, ov = measured["links"].get("all_reduce"), measured["overheads"]
        print(f"wrote {out}: {measured['device']}, {len(measured['gemms'])} GEMM shapes "
              f"({min(g[3] for g in measured['gemms']):.3g}-{max(g[3] for g in measured['gemms']):.3g} TFLOP/s), "
              f"copy {measured['copy_gbps']:.1f} GB/s"
              + (f", memory-bound kernels {measured['kernel_gbps']:.2f} GB/s" if measured.get("kernel_gbps") else "")
              + f", fixed cost per layer {ov['layer_forward'] * 1e6:.0f} us "
              f"forward and {ov['layer_backward'] * 1e6:.0f} us backward"
              + (f", all-reduce alpha {links['alpha_us']:.1f} us beta {links['beta_gbs']:.2f} GB/s over "
                 f"{measured['world']} processes" if links else ""))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
