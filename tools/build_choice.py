"""Build an offline multiple-choice set from Python source: which function does this docstring describe?

    .venv/bin/python tools/build_choice.py --out runs/docstring_choice.jsonl [--n 300] [--seed 0] [--source DIR]

The machine has no internet, so no ARC or HellaSwag; the Python standard library is on every machine with
Python. Each item is one public function or method of one module (a top-level .py file of --source,
default the running Python's standard library; `argparse.py` and the `json` package are left out, since
the compression table calibrates on the one and measures perplexity on the other), read with `ast`
(nothing is imported). The context is the module's name and the first paragraph of the docstring as
comments, then `def`; the four choices are the function's name and three other names from the same
module, each followed by `(` so that a name that is a prefix of another cannot win by stopping early:

    {"context": "# shutil.py\\n# Recursively move a file or directory to another location. ...\\ndef",
     "choices": ["copytree(", "move(", "rmtree(", "which("], "answer": 1}

the format `megaloom eval MODEL --task choice --data FILE` reads (docs/eval.md). Docstrings of 20 to 200
characters that do not contain any of the item's names (which would give the answer away) are eligible;
at most --per-module items come from one module. `random.Random(--seed)` draws the items, the distractors
and the order of the choices, so the same arguments and the same Python give the same bytes; the last
line printed names the item count and the SHA-256 of the file. A smaller --n gives the first items of a
larger set with the same seed. Chance is 25%.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED = ("argparse", "json")  # the compression table's calibration text and held-out perplexity file
MIN_DOC, MAX_DOC = 20, 200


@dataclass(frozen=True)
class Function:
    module: str
    name: str
    doc: str  # the first paragraph of the docstring, on one line


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def module_functions(path: Path) -> list[Function]:
    """Public functions and methods of public classes of one source file with a docstring, one per name
    (a name defined twice keeps its first docstring), in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_"):
            nodes += [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found: dict[str, Function] = {}
    for node in nodes:
        doc = ast.get_docstring(node)
        if node.name.startswith("_") or node.name in found or not doc:
            continue
        found[node.name] = Function(path.stem, node.name, first_paragraph(doc))
    return list(found.values())


def mentions(doc: str, name: str) -> bool:
    """The docstring names the function (as a word, or in its parts: `get_close_matches` in `close matches`)."""
    low = doc.lower()
    return re.search(rf"\b{re.escape(name.lower())}\b", low) is not None or name.lower().replace("_", " ") in low


def build(out: Path, n: int = 300, seed: int = 0, source: Path | None = None, per_module: int = 6) -> dict:
    source = Path(source or sysconfig.get_paths()["stdlib"])
    modules = {}
    for path in sorted(source.glob("*.py")):
        if path.stem.startswith("_") or path.stem in EXCLUDED:
            continue
        funcs = module_functions(path)
        if len(funcs) >= 4:
            modules[path.stem] = funcs
    rng = random.Random(seed)
    candidates = [f for funcs in modules.values() for f in funcs if MIN_DOC <= len(f.doc) <= MAX_DOC]
    rng.shuffle(candidates)
    taken: dict[str, int] = {}
    lines = []
    for f in candidates:
        if len(lines) == n:
            break
        if taken.get(f.module, 0) == per_module:
            continue
        others = [g.name for g in modules[f.module] if g.name != f.name and not mentions(f.doc, g.name)]
        if mentions(f.doc, f.name) or len(others) < 3:
            continue
        names = [f.name, *rng.sample(others, 3)]
        rng.shuffle(names)
        taken[f.module] = taken.get(f.module, 0) + 1
        lines.append(json.dumps({"context": f"# {f.module}.py\n# {f.doc}\ndef", "choices": [c + "(" for c in names],
                                 "answer": names.index(f.name)}) + "\n")
    data = "".join(lines).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return {"items": len(lines), "modules": len(taken), "sha256": hashlib.sha256(data).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/docstring_choice.jsonl"))
    p.add_argument("--n", type=int, default=300, help="items (fewer if the source has fewer eligible functions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", type=Path, default=None, help="directory of .py files (default: the standard library)")
    p.add_argument("--per-module", type=int, default=6, help="at most this many items from one module")
    args = p.parse_args(argv)
    info = build(args.out, args.n, args.seed, args.source, args.per_module)
    print(f"wrote {args.out}: {info['items']} items from {info['modules']} modules, sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
