"""The `megaloom` command. The environment is read here, at the edge, and nowhere deeper."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megaloom.config import Config, ConfigError, describe, load_config
from megaloom.data.sources import DataError
from megaloom.errors import RunError
from megaloom.parallel.launch import LaunchEnv

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, RunError)


def cache_root() -> Path:
    """MEGALOOM_CACHE, else $XDG_CACHE_HOME/megaloom, else ~/.cache/megaloom."""
    if os.environ.get("MEGALOOM_CACHE"):
        return Path(os.environ["MEGALOOM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megaloom"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config file (e.g. configs/debug.toml); defaults apply without one")
    p.add_argument("--config", dest="config_flag", metavar="FILE", help="the same, as a flag")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")


def _load(args: argparse.Namespace) -> Config:
    if args.config and args.config_flag and args.config != args.config_flag:
        raise ConfigError(f"two config files given ('{args.config}' and --config '{args.config_flag}'); pass one")
    return load_config(args.config or args.config_flag, args.overrides)


# ---------------------------------------------------------------- verbs


def launch_env() -> LaunchEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK (and the restart count and store address) as torchrun sets them;
    a plain `megaloom train` is one process."""
    e = os.environ
    return LaunchEnv(int(e.get("RANK", 0)), int(e.get("WORLD_SIZE", 1)), int(e.get("LOCAL_RANK", 0)),
                     restart=int(e.get("TORCHELASTIC_RESTART_COUNT", 0)), master_addr=e.get("MASTER_ADDR", ""),
                     master_port=int(e.get("MASTER_PORT", 0)), agent_store=e.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from megaloom.data.corpus import ensure_corpus_for
    from megaloom.observe.progress import Console
    from megaloom.parallel.launch import start
    from megaloom.train.trainer import Trainer

    cfg = _load(args)
    evals = []
    if cfg.train.eval_tasks:  # checked (flags, files) before anything starts
        from megaloom.eval.training import training_evals

        evals = training_evals(cfg)
    env = launch_env()
    if env.world_size > 1 and not args.run_dir:
        raise ConfigError("--run-dir is required under torchrun, so that every process writes the same run directory")
    grid, device = start(cfg, env)
    console = Console(quiet=env.rank != 0)
    if env.world_size > 1:
        console.print(grid.describe())
    name = Path(args.config or args.config_flag or "default").stem
    run_dir = Path(args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    say = lambda msg: console.print(f"    data  {msg}")  # noqa: E731
    if env.rank == 0:  # one process prepares the corpus, the others then find it ready
        ensure_corpus_for(cfg, cache_root(), progress=say)
    if dist.is_initialized():
        dist.barrier()
    corpus = ensure_corpus_for(cfg, cache_root(), progress=say)
    try:
        Trainer(cfg, run_dir, corpus, console, grid, device, evals=evals, **training_parts(cfg)).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def model_parts(cfg: Config) -> dict:
    """How `megaloom train` builds the model of `cfg`, from the layers above the training stack: its pretrained
    weights (`weights`), the PEFT hook (`adapt`) and the fake quantization of quantization-aware training
    (`quantize`); None where the config has none. PPO builds a reward model's run with them too."""
    weights = None
    if cfg.model.pretrained:  # opened and checked against the model before any model is built
        from megaloom.interop import PretrainedWeights

        weights = PretrainedWeights(cfg.model)
    adapt = None
    if cfg.peft.method != "none":  # parameter-efficient fine-tuning: adapters on a frozen base
        from megaloom.tune.peft import PeftHook

        adapt = PeftHook(cfg)
    quantize = None
    if cfg.qat.scheme != "none":  # quantization-aware training: fake-quantized block linears
        from megaloom.compress.qat import QATHook

        quantize = QATHook(cfg)
    return {"weights": weights, "adapt": adapt, "quantize": quantize}


def training_parts(cfg: Config) -> dict:
    """What `megaloom train` hands the Trainer besides the config, from the layers above it: the pretrained
    weights, the PEFT hook and the fake quantization of quantization-aware training ([qat]) (`model_parts`),
    the objective (alignment, distillation) and the step hooks (keep_sparsity)."""
    parts = model_parts(cfg)
    objective = None
    if cfg.train.objective == "dpo":  # alignment objectives sit above the training loop
        from megaloom.align.dpo import DPOObjective

        objective = DPOObjective(cfg)
    elif cfg.train.objective == "reward":
        from megaloom.align.reward import RewardObjective

        objective = RewardObjective(cfg)
    elif cfg.train.objective == "distill":  # compression sits above the training loop too
        from megaloom.compress.distill import TeacherLayers, distill_objective

        objective = distill_objective(cfg)
        if cfg.distill.init_from_teacher_layers:
            parts["weights"] = TeacherLayers(cfg, objective.teacher_spec)
    elif cfg.train.objective == "grpo":
        from megaloom.align.grpo import GRPOObjective

        objective = GRPOObjective(cfg)
    elif cfg.train.objective == "ppo":
        from megaloom.align.ppo import PPOObjective

        objective = PPOObjective(cfg, model_parts=model_parts)  # a reward model's run is built as it was
    step_hooks = []
    if cfg.train.keep_sparsity:  # pruned weights stay zero (compression sits above the training loop)
        from megaloom.compress.sparsity import KeepSparsity

        step_hooks.append(KeepSparsity())
    return {**parts, "objective": objective, "step_hooks": step_hooks}


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from megaloom.data.corpus import ensure_corpus_for

    cfg = _load(args)
    if args.out:
        cfg.data.dir = args.out
    info = ensure_corpus_for(cfg, cache_root(), progress=lambda msg: print(f"data: {msg}", flush=True))
    print(f"corpus {info.directory}: {info.train_tokens:,} train tokens in {info.train_docs:,} documents, "
          f"{info.val_tokens:,} validation tokens in {info.val_docs:,} documents, "
          f"{info.tokenizer} tokenizer with {info.vocab_size} tokens ({info.dtype})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from megaloom.eval.command import generate_command

    return generate_command(args, launch_env())


def cmd_eval(args: argparse.Namespace) -> int:
    from megaloom.eval.command import eval_command

    return eval_command(args, launch_env())


def cmd_convert(args: argparse.Namespace) -> int:
    from megaloom.interop.load import is_pretrained
    from megaloom.train.checkpoint import export_safetensors, import_safetensors, latest_checkpoint, saved_keys

    src, out = Path(args.source), Path(args.output)
    if src.is_dir() and not is_pretrained(src) and "quantization" in saved_keys(latest_checkpoint(src)):
        raise ConfigError(f"'{src}' is a quantized checkpoint (megaloom quantize); convert exports full-precision "
                          "weights: convert the model it was quantized from, or evaluate this one with megaloom eval")
    if args.merge and args.to != "hf":
        raise ConfigError("--merge writes a Hugging Face model: use it with --to hf")
    if args.to == "peft" or args.merge:
        from megaloom.tune.export import export_merged, export_peft

        if args.merge:
            ckpt, n = export_merged(src, out, max_shard_bytes=int(args.max_shard_gb * 1e9))
            print(f"wrote {out}: {n} tensors from {ckpt}, the adapters merged into the base, as a Hugging Face model")
        else:
            ckpt, n = export_peft(src, out)
            print(f"wrote {out}: {n} adapter tensors from {ckpt} (peft.PeftModel.from_pretrained(base, '{out}') "
                  "loads them)")
    elif args.to == "hf":
        from megaloom.interop import export_hf

        ckpt, n = export_hf(src, out, max_shard_bytes=int(args.max_shard_gb * 1e9))
        print(f"wrote {out}: {n} tensors from {ckpt} as a Hugging Face model (transformers' "
              "AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load it)")
    elif is_pretrained(src):
        from megaloom.interop import import_pretrained

        cfg, n, tokenizer = import_pretrained(src, out)
        print(f"wrote {out}: {n} tensors of a {cfg.model.family} model{' and its tokenizer' if tokenizer else ''} "
              f"as a weights-only megaloom checkpoint (train with --set checkpoint.load={out}, in any layout)")
    elif src.suffix == ".safetensors":
        if not src.is_file():
            raise FileNotFoundError(f"'{src}' does not exist; pass a .safetensors file or a checkpoint/run directory")
        config = Path(args.config).read_text(encoding="utf-8") if args.config else ""
        n = import_safetensors(src, out, config)
        print(f"wrote {out}: {n} tensors as a weights-only megaloom checkpoint "
              f"(train with --set checkpoint.load={out}, in any layout)")
    else:
        if out.suffix != ".safetensors":
            raise ConfigError(f"convert output '{out}' must end in .safetensors when the source is a checkpoint, "
                              "or add --to hf for a Hugging Face directory; e.g. megaloom convert runs/demo "
                              "model.safetensors")
        ckpt = latest_checkpoint(src)
        n = export_safetensors(ckpt, out)
        print(f"wrote {out}: {n} tensors from {ckpt}, consolidated over every layout dimension")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from megaloom.compress.command import quantize_command
    from megaloom.tune.peft import merge_of  # a PEFT run: its adapters folded into the base first

    return quantize_command(args, merge_of=merge_of)


def cmd_prune(args: argparse.Namespace) -> int:
    from megaloom.compress.command import prune_command
    from megaloom.tune.peft import merge_of  # a PEFT run: its adapters folded into the base first

    return prune_command(args, merge_of=merge_of)


def cmd_plot(args: argparse.Namespace) -> int:
    from megaloom.observe.plots import plot_loss

    out = plot_loss([Path(r) for r in args.run_dirs], Path(args.output), args.metric)
    print(f"wrote {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from megaloom.perf.report import info_report, render_info

    cfg = _load(args)
    report = info_report(cfg, recompute=args.recompute)
    print(json.dumps(report, indent=2) if args.json else render_info(report))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from megaloom.observe.timeline import draw_timeline, text_timeline
    from megaloom.parallel.schedules import Costs, ScheduleKind, build_schedule, simulate, validate

    sched = build_schedule(args.schedule, args.pp, args.microbatches, args.chunks)
    validate(sched)
    half = args.backward / 2  # the split backward halves B unless told otherwise
    costs = Costs(args.forward, args.backward, half if args.backward_input is None else args.backward_input,
                  half if args.backward_weight is None else args.backward_weight, args.p2p)
    sim = simulate(sched, costs)
    p, m, v = sched.pp, sched.microbatches, sched.chunks
    print(text_timeline(sim, args.width))
    if ScheduleKind(args.schedule) is ScheduleKind.ZB_H1:  # Qi et al. 2023, §3.1
        ref = f"Qi et al.: (p-1)/(3m) = {(p - 1) / (3 * m):.1%} when F = I = W and m >= p"
    elif v > 1:
        ref = f"paper: (p-1)/(m*v) = {(p - 1) / (m * v):.1%}"
    else:
        ref = f"paper: (p-1)/m = {(p - 1) / m:.1%}"
    print(f"bubble: {sim.bubble_fraction:.1%} of ideal time ({ref})")
    unit = "microbatch-chunks" if v > 1 else "microbatches"
    print(f"peak in flight ({unit} with activations held): "
          + ", ".join(f"rank {r}: {n}" for r, n in enumerate(sim.peak_in_flight)))
    if args.output:
        print(f"wrote {draw_timeline(sim, Path(args.output))}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from megaloom.perf.commands import simulate_command

    return simulate_command(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from megaloom.perf.commands import plan_command

    return plan_command(args)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaloom", description="Train transformer language models, "
                                     "from one CPU to thousands of GPUs.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("train", help="train a model from a config", description="Train a model. Prepares the "
                         "corpus on first use, writes metrics.jsonl, TensorBoard logs, checkpoints and loss.png "
                         "into the run directory.")
    _config_args(p)
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default runs/<config>-<time>)")
    p.set_defaults(func=cmd_train)

    data = verbs.add_parser("data", help="corpus preparation").add_subparsers(dest="data_verb", metavar="ACTION",
                                                                                required=True)
    p = data.add_parser("prepare", help="tokenize text files, directories or JSONL into a corpus",
                        description="Tokenize data.sources into flat token files plus a document index, "
                                    "with a deterministic train/validation split. With train.objective=\"sft\": "
                                    "conversations (JSONL or Parquet) rendered with the chat template, plus the "
                                    "mask of the tokens the loss counts.")
    _config_args(p)
    p.add_argument("--out", metavar="DIR", help="corpus directory (same as --set data.dir=DIR)")
    p.set_defaults(func=cmd_data_prepare)

    p = verbs.add_parser("generate", help="sample text from a model, or chat with it",
                         description="Sample text from MODEL (a run directory's newest checkpoint, a checkpoint, a "
                                     "Hugging Face model directory or a .gguf file); --chat applies the model's own "
                                     "chat template. Under torchrun in any --tp/--pp layout.")
    p.add_argument("checkpoint", metavar="MODEL", help="run directory, checkpoint, Hugging Face directory or .gguf file")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    prompt.add_argument("--chat", metavar="MESSAGE", help="a user message, rendered with the model's chat template "
                        "(add_generation_prompt); prints the assistant's reply")
    p.add_argument("--system", metavar="TEXT", help="the system message of the --chat conversation")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (under torchrun)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="compute precision")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (no KV cache)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("convert", help="checkpoint <-> Hugging Face directory, .gguf or safetensors file",
                         description="A megaloom checkpoint (or a run directory's newest), saved in any layout, to a "
                                     "Hugging Face model directory (--to hf) or to one consolidated safetensors file "
                                     "with canonical names; or a Hugging Face directory, a .gguf file or a "
                                     "safetensors file to a weights-only checkpoint that checkpoint.load accepts in "
                                     "any layout (docs/interop.md).")
    p.add_argument("source", help="checkpoint or run directory, Hugging Face model directory, .gguf or .safetensors file")
    p.add_argument("output", help="the directory to create (checkpoint or, with --to hf, Hugging Face model), or a "
                                  ".safetensors file")
    p.add_argument("--to", choices=["hf", "peft"], help="hf: write a Hugging Face model directory (config.json, "
                   "safetensors, tokenizer, generation_config.json); peft: a PEFT run's adapters as a PEFT adapter "
                   "directory (adapter_model.safetensors, adapter_config.json; docs/finetuning.md)")
    p.add_argument("--merge", action="store_true", help="--to hf of a PEFT run: the base with the adapters merged in")
    p.add_argument("--max-shard-gb", type=float, default=2.0, metavar="GB",
                   help="--to hf: split the safetensors into shards of at most this many GB (default 2)")
    p.add_argument("--config", metavar="FILE", help="safetensors -> checkpoint: a config.toml to store alongside")
    p.set_defaults(func=cmd_convert)

    from megaloom.eval.spec import add_eval_args

    p = verbs.add_parser("eval", help="perplexity and multiple-choice accuracy, as lm-evaluation-harness scores them",
                         description="Evaluate MODEL (a run, a checkpoint, a Hugging Face directory or a .gguf file) "
                                     "with lm-evaluation-harness semantics: --task perplexity (rolling windows) or "
                                     "--task choice (accuracy); under torchrun in any --tp/--pp layout, the other "
                                     "processes splitting the data (docs/eval.md).")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)

    from megaloom.compress.command import add_calib_args

    p = verbs.add_parser("quantize", help="post-training quantization: int8 / int4 weights (torchao), GPTQ",
                         description="Quantize the linears of MODEL's transformer blocks (a run, a checkpoint, a "
                                     "Hugging Face directory or a .gguf file) and write a checkpoint directory that "
                                     "megaloom eval and generate load in any --tp/--pp layout (docs/compression.md).")
    p.add_argument("model", metavar="MODEL", help="run directory, checkpoint, Hugging Face directory or .gguf file")
    p.add_argument("output", metavar="OUT", help="the checkpoint directory to create")
    p.add_argument("--method", choices=["int8-weight", "int8-dynamic", "int4-weight", "int8-dynamic-act-int4-weight",
                                        "gptq"],
                   help="int8-weight, int8-dynamic (int8 activations too), int4-weight, int8-dynamic-act-int4-weight: "
                        "torchao round to nearest; gptq: int4 by GPTQ with --calib (required unless --from-qat)")
    p.add_argument("--from-qat", action="store_true", help="MODEL is a quantization-aware training run ([qat]): its "
                   "scheme and group size, its LoRA adapters merged first; the result computes what its fake-quantized "
                   "forward did")
    p.add_argument("--group-size", type=int, metavar="G", help="input features per scale (default: per row for "
                                                                  "int8, 32 for int4 and gptq)")
    p.add_argument("--keep-high-precision", default="embedding,head", metavar="LIST",
                   help="layers left unquantized (default embedding,head)")
    add_calib_args(p)
    p.set_defaults(func=cmd_quantize)

    p = verbs.add_parser("prune", help="post-training pruning: magnitude, Wanda, SparseGPT; unstructured or N:M",
                         description="Prune the linears of MODEL's transformer blocks and write a weights-only "
                                     "checkpoint with the masks (train with train.keep_sparsity = true; convert --to "
                                     "hf like any checkpoint; docs/compression.md).")
    p.add_argument("model", metavar="MODEL", help="run directory, checkpoint, Hugging Face directory or .gguf file")
    p.add_argument("output", metavar="OUT", help="the checkpoint directory to create")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, metavar="S", help="fraction of each linear's weights set to zero")
    p.add_argument("--pattern", metavar="N:M", help="N of every M consecutive weights set to zero (e.g. 2:4)")
    add_calib_args(p)
    p.set_defaults(func=cmd_prune)

    p = verbs.add_parser("plot", help="loss curves of run directories to a PNG")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", default="loss.png", help="PNG file to write (default loss.png)")
    p.add_argument("--metric", default="loss", help="the metrics.jsonl field to draw, with its val_ value where "
                                                   "present (default loss; e.g. reward for GRPO and PPO)")
    p.set_defaults(func=cmd_plot)

    p = verbs.add_parser("info", help="parameters, FLOPs per token and memory estimate of a config")
    _config_args(p)
    p.add_argument("--recompute", choices=["none", "selective", "full"],
                   help="activation recomputation assumed by the memory estimate (default: the config's train.recompute)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_info)

    p = verbs.add_parser("schedule", help="simulate a pipeline schedule: timeline, bubble, activations in flight",
                         description="Build, validate and simulate a pipeline schedule in one process; print its "
                                     "timeline, bubble fraction and peak activations in flight per rank "
                                     "(Narayanan et al. 2021, section 2.2).")
    p.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved", "zb-h1"], default="1f1b")
    p.add_argument("--pp", type=int, required=True, metavar="P", help="pipeline stages (parallel.pp)")
    p.add_argument("--microbatches", type=int, required=True, metavar="M", help="microbatches per batch")
    p.add_argument("--chunks", type=int, default=1, metavar="V", help="model chunks per rank (interleaved)")
    p.add_argument("--forward", type=float, default=1.0, help="forward time of one microbatch on one rank")
    p.add_argument("--backward", type=float, default=2.0, help="backward time (the paper's t_b = 2 t_f)")
    p.add_argument("--backward-input", type=float, help="zb-h1: input-gradient time I (default backward/2)")
    p.add_argument("--backward-weight", type=float, help="zb-h1: weight-gradient time W (default backward/2)")
    p.add_argument("--p2p", type=float, default=0.0, help="latency of one send between ranks")
    p.add_argument("--width", type=int, help="fit the text timeline into this many characters")
    p.add_argument("-o", "--output", metavar="PNG", help="also draw the timeline to this PNG")
    p.set_defaults(func=cmd_schedule)

    from megaloom.perf.commands import add_calibrate_args, add_plan_args, add_simulate_args

    p = verbs.add_parser("simulate", help="predict step time, throughput, MFU and memory of one layout on a cluster",
                         description="Simulate one training step of a layout (t, p, d, b, v, recompute, ZeRO, "
                                     "sequence parallelism) on a cluster: event-driven over the pipeline schedule's "
                                     "action lists, with GEMM, network and memory models (docs/planner.md).")
    add_simulate_args(p)
    p.set_defaults(func=cmd_simulate)

    p = verbs.add_parser("plan", help="search every layout of a model on a cluster and rank them by throughput",
                         description="Enumerate every valid layout for a model, a GPU count and a global batch, drop "
                                     "what does not fit in memory, rank by predicted throughput and explain the "
                                     "winner against the runners-up (docs/planner.md).")
    add_plan_args(p)
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("calibrate", help="measure this machine's GEMMs, memory and links into a cluster file",
                         description="Measure the GEMM shapes the planner times, the copy bandwidth and (under "
                                     "torchrun) the collectives over the launched processes, and write a cluster "
                                     "TOML that `simulate` and `plan` take as --cluster (docs/planner.md).")
    add_calibrate_args(p)
    p.set_defaults(func=cmd_calibrate)
    return parser


def cmd_calibrate(args: argparse.Namespace) -> int:
    from megaloom.perf.commands import calibrate_command

    return calibrate_command(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "help_config", False):
        print(describe())
        return 0
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"megaloom: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megaloom: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
