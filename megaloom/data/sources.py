"""Where training text comes from: the stdlib, text files, directories and .jsonl files.

Every source turns into a stream of `Document`s in a fixed order, so that the same sources
always give the same corpus (the split and the byte-identical .bin files depend on it).
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STDLIB = "stdlib"

# The stdlib dir of some installs also holds third-party packages; they are not "the stdlib" and
# differ between machines, which would make the default corpus machine-dependent.
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})


class DataError(ValueError):
    """Bad data settings or input; the message names the setting, the value and the fix."""


@dataclass(frozen=True)
class Document:
    """One training document. `key` is stable across runs; the train/val split hashes it."""

    key: str
    text: str


def iter_documents(sources: list[str]) -> Iterator[Document]:
    """Yield the non-empty documents of every source, source by source, in a fixed order."""
    for source in sources:
        yield from _iter_source(source)


def stdlib_dir() -> Path:
    """The running interpreter's stdlib directory (what the "stdlib" source reads)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _iter_source(source: str) -> Iterator[Document]:
    if source == STDLIB:
        yield from _iter_stdlib()
        return
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"data.sources: {source!r} does not exist; "
            'give a file, a directory, a .jsonl file, or "stdlib"'
        )
    if path.is_dir():
        yield from _iter_directory(path)
    elif path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path)
    else:
        yield from _iter_text_file(path)


def _iter_stdlib() -> Iterator[Document]:
    root = stdlib_dir()
    for rel in _walk_sorted(root, _STDLIB_EXCLUDED_DIRS, skip_hidden=False):
        if not rel.endswith(".py"):
            continue
        text = _read_text(root / rel)
        if text:
            yield Document(key=f"stdlib/{rel}", text=text)


def _iter_directory(root: Path) -> Iterator[Document]:
    for rel in _walk_sorted(root, frozenset(), skip_hidden=True):
        # Binary and non-UTF-8 files are common in real directories (images, .pyc, ...);
        # skipping them silently is what a user pointing at a folder of text expects.
        text = _read_text(root / rel)
        if text:
            yield Document(key=str(root / rel), text=text)


def _iter_text_file(path: Path) -> Iterator[Document]:
    text = _read_text(path)
    if text is None:
        raise DataError(
            f"data.sources: {str(path)!r} is not UTF-8 text (or contains NUL bytes); "
            "convert it to UTF-8 or remove it from data.sources"
        )
    if text:
        yield Document(key=str(path), text=text)


def _iter_jsonl(path: Path) -> Iterator[Document]:
    # Binary mode with per-line decoding, so a bad byte is reported on its exact line.
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8", errors="strict")
            except UnicodeDecodeError:
                raise DataError(
                    f"data.sources: {str(path)!r} line {line_number} is not UTF-8; "
                    "re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            text = _jsonl_text(path, line_number, line)
            if text:
                yield Document(key=f"{path}:{line_number}", text=text)


def _jsonl_text(path: Path, line_number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(
            f"data.sources: {str(path)!r} line {line_number} is not a JSON object with a string "
            '"text" field; each line must look like {"text": "..."}'
        )
    return record["text"]


def _walk_sorted(root: Path, excluded: frozenset[str], *, skip_hidden: bool) -> list[str]:
    """Relative POSIX paths of all regular files under `root`, sorted as strings.

    Sorting the full relative paths (rather than trusting os.walk's directory order, which
    is filesystem-dependent) is what makes the document order identical on every machine.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in excluded and not (skip_hidden and d.startswith("."))
        ]
        for name in filenames:
            full = Path(dirpath, name)
            if full.is_file():
                found.append(full.relative_to(root).as_posix())
    return sorted(found)


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not NUL-free UTF-8 (i.e. probably not text)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return None
