"""Turn sources into a prepared corpus: a tokenizer plus flat train/val token files.

The output is a pure function of the settings (and the source files' contents), built in a
temp dir and renamed into place, so a crash never leaves a half-written corpus behind and a
second call with the same settings is free.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megaloom.data.sources import STDLIB, DataError, Document, iter_documents, stdlib_dir
from megaloom.data.tokenizer import Tokenizer, gpt2_tokenizer, pretrained_tokenizer, train_bpe

# Bump when the on-disk layout or the tokenization changes, so old caches are not reused.
FORMAT_VERSION = 1
ENCODE_BATCH_DOCS = 256
_TOKENIZERS = ("bpe", "gpt2", "pretrained")
_PROGRESS_EVERY_S = 2.0

Progress = Callable[[str], None]


@dataclass
class CorpusInfo:
    """What `prepare_corpus` produced; `directory` holds train.bin, val.bin, tokenizer/, ..."""

    directory: Path
    tokenizer: str
    vocab_size: int
    eos_id: int
    dtype: str
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int
    sources: list[str]
    group: int = 1  # documents per item: 2 for preference pairs (chosen, rejected), adjacent
    prompts: bool = False  # documents are prompts to generate from (RL), their records in {split}.records.jsonl


    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / "tokenizer"


@dataclass(frozen=True)
class _Plan:
    """The fixed document list: how many docs to read and which key goes to validation."""

    n_docs: int
    forced_val: int | None  # index of the train doc moved to val when val would be empty


def prepare_corpus(
    sources: list[str],
    out_dir: Path,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    gpt2_ranks: str = "",
    val_fraction: float = 0.005,
    seed: int = 0,
    bpe_train_bytes: int = 8_000_000,
    max_bytes: int = 0,
    pretrained: str = "",
    progress: Progress | None = None,
) -> CorpusInfo:
    """Prepare (or reuse, when already prepared with identical settings) a corpus in out_dir.
    tokenizer = "pretrained": the tokenizer of `pretrained` (a Hugging Face directory or a .gguf file)."""
    _check_settings(sources, tokenizer, vocab_size, val_fraction, bpe_train_bytes, max_bytes)
    if tokenizer == "pretrained" and not pretrained:
        raise DataError('data.tokenizer = "pretrained" needs model.pretrained, the model whose tokenizer it is')
    settings = {
        "format_version": FORMAT_VERSION,
        "sources": [_resolve_source(s) for s in sources],
        "tokenizer": tokenizer,
        "vocab_size": int(vocab_size),
        "gpt2_ranks": str(Path(gpt2_ranks).resolve()) if gpt2_ranks else "",
        # float(): 0 and 0.0 are the same setting and must hash the same.
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "bpe_train_bytes": int(bpe_train_bytes),
        "max_bytes": int(max_bytes),
    }
    if tokenizer == "pretrained":  # only then: the other corpora keep their hashes
        settings["pretrained"] = str(Path(pretrained).resolve())
    say = progress or (lambda _msg: None)
    return build_once(Path(out_dir), settings, lambda tmp: _build(tmp, sources, settings, say))


def build_once(out_dir: Path, settings: dict, build: Callable[[Path], CorpusInfo]) -> CorpusInfo:
    """The corpus of `settings` in out_dir: the one already there when its settings hash matches, else
    `build(tmp)` into a temporary sibling directory, published atomically with its metadata."""
    digest = settings_hash(settings)
    existing = _existing(out_dir, digest)
    if existing is not None:
        return existing
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed run that had our pid
    tmp.mkdir(parents=True)
    try:
        info = build(tmp)
        _write_meta(tmp, info, settings, digest)
        return _publish(tmp, out_dir, digest, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_corpus_info(out_dir: Path) -> CorpusInfo:
    """Read the CorpusInfo of an already prepared corpus."""
    out_dir = Path(out_dir)
    return _info_from_meta(out_dir, _read_meta(out_dir))


def settings_hash(settings: dict) -> str:
    """Stable short hash of the settings that determine a prepared corpus."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_validation(key: str, seed: int, val_fraction: float) -> bool:
    """The split rule: a pure function of (seed, key), so other documents cannot move it."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _check_settings(
    sources: list[str],
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    bpe_train_bytes: int,
    max_bytes: int,
) -> None:
    if isinstance(sources, str) or not sources or not all(isinstance(s, str) for s in sources):
        raise DataError(
            f'data.sources: {sources!r} is not a non-empty list of strings; write e.g. ["stdlib"]'
        )
    if tokenizer not in _TOKENIZERS:
        raise DataError(f'data.tokenizer: {tokenizer!r} is unknown; use "bpe" or "gpt2"')
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction: {val_fraction} is outside [0, 1); use e.g. 0.005")
    if bpe_train_bytes <= 0:
        raise DataError(f"data.bpe_train_bytes: {bpe_train_bytes} must be > 0; use e.g. 8000000")
    if max_bytes < 0:
        raise DataError(f"data.max_bytes: {max_bytes} must be >= 0 (0 = no limit)")
    if tokenizer == "bpe" and vocab_size < 258:
        raise DataError(f"data.vocab_size: {vocab_size} is too small for BPE; use at least 258")


def _resolve_source(source: str) -> str:
    # "stdlib" differs between interpreters, so the cache key names which stdlib it was.
    if source == STDLIB:
        return f"{STDLIB}:{stdlib_dir()}"
    return str(Path(source).resolve())


def _existing(out_dir: Path, digest: str) -> CorpusInfo | None:
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return None
    if not (out_dir / "meta.json").is_file():
        raise DataError(
            f"data.dir: {str(out_dir)!r} exists but holds no prepared corpus; "
            "choose another data.dir or delete it"
        )
    meta = _read_meta(out_dir)
    if meta.get("settings_hash") != digest:
        raise DataError(
            f"data.dir: {str(out_dir)!r} holds a corpus prepared with other settings "
            f"(hash {meta.get('settings_hash')}, now {digest}); choose another data.dir or delete it"
        )
    return _info_from_meta(out_dir, meta)


def _publish(tmp: Path, out_dir: Path, digest: str, info: CorpusInfo) -> CorpusInfo:
    try:
        os.replace(tmp, out_dir)  # atomic; also replaces an empty out_dir
    except OSError:
        # Lost a race with a concurrent prepare: fine if it built the very same corpus.
        existing = _existing(out_dir, digest)
        if existing is None:
            raise
        return existing
    info.directory = out_dir
    return info


def _build(tmp: Path, sources: list[str], settings: dict, say: Progress) -> CorpusInfo:
    # GPT-2's ranks are loaded first: a missing file should fail before a long scan.
    tok = gpt2_tokenizer(settings["gpt2_ranks"]) if settings["tokenizer"] == "gpt2" else None
    if settings["tokenizer"] == "pretrained":
        tok = pretrained_tokenizer(settings["pretrained"])
    say(f"scanning {', '.join(sources)}")
    plan = _make_plan(sources, settings)
    tok = tok or _train_tokenizer(sources, settings, plan, say)
    tok.save(tmp / "tokenizer")
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    counts = _encode_all(tmp, tok, dtype, _split_docs(sources, settings, plan), say)
    return CorpusInfo(
        directory=tmp,
        tokenizer=tok.kind,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        dtype=np.dtype(dtype).name,
        sources=list(sources),
        **counts,
    )


def _limited(sources: list[str], max_bytes: int) -> Iterator[Document]:
    """The documents, stopping once `max_bytes` of text have been read (0 = all)."""
    total = 0
    for doc in iter_documents(sources):
        if max_bytes and total >= max_bytes:
            return
        total += len(doc.text.encode())
        yield doc


def _make_plan(sources: list[str], settings: dict) -> _Plan:
    n_docs, n_val, last_train = 0, 0, None
    for i, doc in enumerate(_limited(sources, settings["max_bytes"])):
        n_docs += 1
        if is_validation(doc.key, settings["seed"], settings["val_fraction"]):
            n_val += 1
        else:
            last_train = i
    if n_docs == 0:
        raise DataError(f"data.sources: {sources!r} contains no non-empty text documents")
    if last_train is None:
        raise DataError(
            f"data.val_fraction: {settings['val_fraction']} puts all {n_docs} documents into "
            "validation; lower it or add documents"
        )
    # A run with no validation data cannot report a val loss; with >= 2 docs we can spare one.
    forced = last_train if n_val == 0 and n_docs >= 2 else None
    return _Plan(n_docs=n_docs, forced_val=forced)


def _split_docs(sources: list[str], settings: dict, plan: _Plan) -> Iterator[tuple[bool, Document]]:
    """(is_val, doc) for every planned document, in corpus order."""
    docs = itertools.islice(_limited(sources, settings["max_bytes"]), plan.n_docs)
    for i, doc in enumerate(docs):
        val = i == plan.forced_val or is_validation(
            doc.key, settings["seed"], settings["val_fraction"]
        )
        yield val, doc


def _train_tokenizer(sources: list[str], settings: dict, plan: _Plan, say: Progress) -> Tokenizer:
    texts = _bpe_sample(_split_docs(sources, settings, plan), settings["bpe_train_bytes"])
    n_bytes = sum(len(t.encode()) for t in texts)
    say(f"training BPE (vocab {settings['vocab_size']}) on {_mb(n_bytes)}")
    return train_bpe(texts, settings["vocab_size"])


def _bpe_sample(docs: Iterator[tuple[bool, Document]], budget: int) -> list[str]:
    """The first `budget` bytes of the train documents (the last one cut to fit)."""
    texts, used = [], 0
    for is_val, doc in docs:
        if is_val:
            continue
        data = doc.text.encode()
        room = budget - used
        if len(data) >= room:
            # errors="ignore" only drops the partial UTF-8 character left at the cut.
            texts.append(data[:room].decode(errors="ignore"))
            break
        texts.append(doc.text)
        used += len(data)
    return texts


def _encode_all(
    tmp: Path, tok: Tokenizer, dtype: type, docs: Iterator[tuple[bool, Document]], say: Progress
) -> dict[str, int]:
    """Tokenize in batches straight into train.bin / val.bin; returns the token/doc counts."""
    starts: dict[str, list[int]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    last_report, n_docs, reported = time.monotonic(), 0, -1
    with contextlib.ExitStack() as stack:
        files = {split: stack.enter_context(open(tmp / f"{split}.bin", "wb")) for split in sizes}
        while batch := list(itertools.islice(docs, ENCODE_BATCH_DOCS)):
            ids = tok.encode_batch([doc.text for _, doc in batch])
            for (is_val, _), doc_ids in zip(batch, ids, strict=True):
                split = "val" if is_val else "train"
                arr = np.empty(len(doc_ids) + 1, dtype=dtype)
                arr[:-1] = doc_ids
                arr[-1] = tok.eos_id  # every document ends with eos, so docs never run together
                arr.tofile(files[split])
                starts[split].append(sizes[split])
                sizes[split] += len(arr)
            n_docs += len(batch)
            if time.monotonic() - last_report > _PROGRESS_EVERY_S:
                last_report, reported = time.monotonic(), n_docs
                say(f"tokenized {n_docs} docs, {_mtok(sizes['train'] + sizes['val'])} tokens")
    for split, offsets in starts.items():
        np.save(tmp / f"{split}.idx.npy", np.asarray(offsets, dtype=np.int64))
    if reported != n_docs:
        say(f"tokenized {n_docs} docs, {_mtok(sizes['train'] + sizes['val'])} tokens")
    return {
        "train_tokens": sizes["train"],
        "val_tokens": sizes["val"],
        "train_docs": len(starts["train"]),
        "val_docs": len(starts["val"]),
    }


def _write_meta(tmp: Path, info: CorpusInfo, settings: dict, digest: str) -> None:
    meta = asdict(info)
    del meta["directory"]  # the corpus may be moved; the directory is where meta.json is
    meta.update(settings_hash=digest, settings=settings)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _read_meta(out_dir: Path) -> dict:
    path = out_dir / "meta.json"
    if not path.is_file():
        raise DataError(
            f"data.dir: {str(out_dir)!r} holds no prepared corpus (meta.json missing); "
            "run `megaloom data prepare`"
        )
    return json.loads(path.read_text())


def _info_from_meta(out_dir: Path, meta: dict) -> CorpusInfo:
    fields = {k: meta[k] for k in CorpusInfo.__dataclass_fields__ if k != "directory" and k in meta}
    return CorpusInfo(directory=out_dir, **fields)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def _mtok(n_tokens: int) -> str:
    return f"{n_tokens / 1e6:.1f}M"
