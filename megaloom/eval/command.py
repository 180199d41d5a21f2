"""`megaloom eval MODEL --task ...`: load, score, print, and append to the run's metrics.jsonl."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch.distributed as dist

from megaloom.errors import ConfigError
from megaloom.eval.load import Loaded, load_for_inference
from megaloom.eval.score import Scorer
from megaloom.eval.spec import spec_from_args
from megaloom.eval.tasks import run_task
from megaloom.eval.training import metrics_row
from megaloom.observe.progress import Console
from megaloom.parallel.launch import LaunchEnv


def scorer_for(loaded: Loaded, precision: str = "fp32") -> Scorer:
    """The scorer of a loaded model; its context is model.seq_len (a Hugging Face model's
    max_position_embeddings / n_positions unless the run set it lower)."""
    pm, cfg = loaded.pm, loaded.cfg
    tp = pm.tp.size if pm.tp is not None and pm.tp.sequence_parallel else 1
    return Scorer(pm.model, pm.runner, loaded.grid, loaded.device, cfg.model.seq_len, precision, tp)


def eval_command(args: argparse.Namespace, env: LaunchEnv) -> int:
    spec = spec_from_args(args)
    loaded = load_for_inference(args.model, env, args.tp, args.pp, args.device)
    console = Console(quiet=env.rank != 0)
    try:
        result = run_task(spec, scorer_for(loaded, args.precision), loaded.tokenizer, console.counter)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if env.rank != 0:
        return 0
    out = {"model": str(args.model), "task": spec.task, "data": spec.data, **result.metrics}
    if args.json:
        print(json.dumps(_clean(out)))
    else:
        console.print(render(out))
    if args.details:
        Path(args.details).write_text(json.dumps(_clean(result.details), indent=1) + "\n", encoding="utf-8")
    if loaded.run_dir is not None and not args.no_log:
        from megaloom.observe.metrics import MetricsLogger

        logger = MetricsLogger(loaded.run_dir, tensorboard=False)
        logger.log({"step": loaded.step, **metrics_row(result)})
        logger.close()
    return 0


def render(out: dict) -> str:
    lines = [f"{out['task']} on {', '.join(out['data'])} ({out['model']})"]
    for k, v in out.items():
        if k not in ("model", "task", "data"):
            lines.append(f"  {k:<18} {v:.6g}" if isinstance(v, float) else f"  {k:<18} {v}")
    return "\n".join(lines)


def _clean(obj):  # noqa: ANN001, ANN202
    """JSON has no NaN or infinity: null stands for 'not defined' (a standard error of one item)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def generate_command(args: argparse.Namespace, env: LaunchEnv) -> int:
    """`megaloom generate MODEL (--prompt TEXT | --chat MESSAGE [--system TEXT])`, in any --tp/--pp layout."""
    from megaloom.eval.generate import Sampling, chat_prompt, decode_samples, generate_parallel
    from megaloom.eval.requests import HarnessEncoder

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, not args.no_cache)
    sampling.check()
    if args.system is not None and args.chat is None:
        raise ConfigError("--system sets the system message of a --chat conversation; add --chat MESSAGE")
    loaded = load_for_inference(args.checkpoint, env, args.tp, args.pp, args.device)
    tok = loaded.tokenizer
    try:
        if args.chat is not None:
            prompt = chat_prompt(tok, args.chat, args.system)
        else:  # as the model's Hugging Face tokenizer encodes it (BOS where it adds one)
            prompt = HarnessEncoder(tok).encode(args.prompt) or [tok.bos_id if tok.bos_id is not None else tok.eos_id]
        rows = generate_parallel(loaded.pm, loaded.grid, prompt, args.num_samples, sampling, loaded.device,
                                 tok.eos_id, args.precision)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if env.rank == 0:
        texts = decode_samples(tok, rows, len(prompt), tok.eos_id, reply_only=args.chat is not None)
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"----- sample {i + 1}")
            print(text)
    return 0
