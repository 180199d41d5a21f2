"""Build an offline verifiable task for GRPO: two-number arithmetic prompts with their answers.

    .venv/bin/python tools/build_arith.py --out runs/arith.jsonl [--n 2000] [--seed 0] [--max 99]

Each line is {"prompt": "What is A + B? Reply with the number only.", "answer": "C"} (also - and *, chosen
uniformly), A and B drawn uniformly from [0, --max] with numpy's default_rng(--seed): the same arguments give
the same bytes. `megaloom train` with train.objective = "grpo" and rl.reward = "exact_match" scores a
completion 1 when it is exactly the answer (docs/alignment.md). The last line printed names the record count
and the SHA-256 of the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def build(out: Path, n: int = 2000, seed: int = 0, largest: int = 99) -> dict:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, largest + 1, size=2))
        op = "+-*"[int(rng.integers(0, 3))]
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(json.dumps({"prompt": f"What is {a} {op} {b}? Reply with the number only.",
                                 "answer": str(answer)}) + "\n")
    data = "".join(lines).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return {"records": n, "sha256": hashlib.sha256(data).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/arith.jsonl"))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max", type=int, default=99, help="largest operand")
    args = p.parse_args(argv)
    info = build(args.out, args.n, args.seed, args.max)
    print(f"wrote {args.out}: {info['records']} records, sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
