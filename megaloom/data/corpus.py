"""Where a config's prepared corpus lives, and preparing it on first use."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megaloom.config import DataConfig
from megaloom.data.prepare import CorpusInfo, Progress, prepare_corpus
from megaloom.data.sources import STDLIB

# The train/validation split is a property of the corpus, not of a run: every run on the same data
# settings sees the same held-out documents whatever its train.seed.
SPLIT_SEED = 0


def corpus_dir(data: DataConfig, cache_root: Path) -> Path:
    """`data.dir` if set, else `<cache_root>/corpora/<name>-<hash of the data settings>`."""
    if data.dir:
        return Path(data.dir)
    sources = [s if s == STDLIB else str(Path(s).resolve()) for s in data.sources]
    key = json.dumps({"sources": sources, "tokenizer": data.tokenizer, "vocab_size": data.vocab_size,
                      "gpt2_ranks": data.gpt2_ranks, "val_fraction": data.val_fraction,
                      "max_bytes": data.max_bytes, "bpe_train_bytes": data.bpe_train_bytes}, sort_keys=True)
    name = "stdlib" if sources == [STDLIB] else Path(sources[0]).name or "corpus"
    digest = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    return Path(cache_root) / "corpora" / f"{name}-{data.tokenizer}-{digest}"


def ensure_corpus(data: DataConfig, cache_root: Path, progress: Progress | None = None) -> CorpusInfo:
    """Prepare the corpus of `data` (or reuse it when it is already prepared with the same settings)."""
    return prepare_corpus(data.sources, corpus_dir(data, cache_root), tokenizer=data.tokenizer,
                          vocab_size=data.vocab_size, gpt2_ranks=data.gpt2_ranks, val_fraction=data.val_fraction,
                          seed=SPLIT_SEED, bpe_train_bytes=data.bpe_train_bytes, max_bytes=data.max_bytes,
                          progress=progress)
