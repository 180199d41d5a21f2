"""Build an offline instruction dataset from the Python standard library: docstring -> function.

    .venv/bin/python tools/build_instruct.py --out runs/stdlib-instruct.jsonl [--max-records 2000]

Recipe (deterministic: the same interpreter's standard library gives the same bytes):
1. The .py files under the running interpreter's stdlib directory, sorted by relative path; directories
   `site-packages`, `dist-packages`, `test`, `tests`, `idle_test` and any file or directory whose name
   starts with "_" or "." are skipped (private modules, test suites, third-party code).
2. Each file is parsed with `ast`; files that do not parse are skipped. Its public top-level functions
   (name not starting with "_", no decorators) with a docstring of 40-600 characters and a body of
   3-40 lines besides the docstring are kept, in file order.
3. A record asks for the function from its module, name, signature and docstring, and answers with the
   function's source (exactly as written, comments included) without the docstring:
   user: "Write the function `NAME(ARGS)` of the module `MODULE`.\\n\\nDOCSTRING"
   assistant: "def NAME(ARGS):\\n    BODY"
   A (name, body) seen before is skipped, and the output stops after --max-records records.
4. Written as JSON lines, {"messages": [user, assistant]} (--format chat, the default) or {"prompt",
   "response"} (--format prompt_response); --parquet also writes the same records as Parquet (pyarrow).
5. --format preference writes preference pairs for DPO and reward models: {"prompt", "chosen",
   "rejected"}, chosen = the record's own function, rejected = the function of record (i + n // 2) mod n
   (n records): a well-formed answer to another request, so the preference is about following the prompt.

The last line printed names the Python version, the record count and the SHA-256 of the file, which is
how a run says which data it used.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
DOC_CHARS = (40, 600)
BODY_LINES = (3, 40)


def stdlib_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("_", "."))]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith(("_", "."))]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def functions(path: Path, module: str) -> Iterator[dict]:
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = text.splitlines()
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
            continue
        doc = ast.get_docstring(node)
        if not doc or not DOC_CHARS[0] <= len(doc) <= DOC_CHARS[1] or len(node.body) < 2:
            continue
        header = lines[node.lineno - 1:node.body[0].lineno - 1]  # the def line(s), up to the docstring
        body = lines[node.body[0].end_lineno:node.end_lineno]  # everything after the docstring
        if not BODY_LINES[0] <= len(body) <= BODY_LINES[1] or not header:
            continue
        code = textwrap.dedent("\n".join(header + body)).rstrip()
        args = ast.unparse(node.args)
        yield {"name": node.name, "module": module, "signature": f"{node.name}({args})", "doc": doc, "code": code}


def records(root: Path, max_records: int) -> Iterator[dict]:
    seen: set[str] = set()
    count = 0
    for path in stdlib_files(root):
        rel = path.relative_to(root).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for f in functions(path, module):
            key = hashlib.sha256(f"{f['name']}\n{f['code']}".encode()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            yield {"prompt": f"Write the function `{f['signature']}` of the module `{f['module']}`.\n\n{f['doc']}",
                   "response": f["code"]}
            count += 1
            if count >= max_records:
                return


def build(out: Path, max_records: int = 2000, fmt: str = "chat", parquet: bool = False,
          root: Path | None = None) -> dict:
    """Write the dataset to `out` (JSON lines); returns what the last printed line says."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    rows = []
    found = list(records(root, max_records))
    for i, r in enumerate(found):
        if fmt == "chat":
            rows.append({"messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["response"]}]})
        elif fmt == "preference":
            other = found[(i + len(found) // 2) % len(found)]
            rows.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": other["response"]})
        else:
            rows.append(r)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    out.write_bytes(data)
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out.with_suffix(".parquet"))
    return {"python": sys.version.split()[0], "records": len(rows), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/stdlib-instruct.jsonl"), help="JSON lines file to write")
    p.add_argument("--max-records", type=int, default=2000, help="stop after this many records")
    p.add_argument("--format", choices=["chat", "prompt_response", "preference"], default="chat")
    p.add_argument("--parquet", action="store_true", help="also write OUT with the suffix .parquet")
    args = p.parse_args(argv)
    info = build(args.out, args.max_records, args.format, args.parquet)
    print(f"wrote {args.out}: {info['records']} records, {info['bytes']:,} bytes, Python {info['python']}, "
          f"sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
