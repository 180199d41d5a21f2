"""Where a config's prepared corpus lives, and preparing it on first use."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megaloom.config import Config, DataConfig
from megaloom.data.prepare import CorpusInfo, Progress, prepare_corpus
from megaloom.data.sft import files_hash, prepare_sft_corpus
from megaloom.data.sources import STDLIB

# The train/validation split is a property of the corpus, not of a run: every run on the same data
# settings sees the same held-out documents whatever its train.seed.
SPLIT_SEED = 0


def corpus_dir(data: DataConfig, cache_root: Path, pretrained: str = "") -> Path:
    """`data.dir` if set, else `<cache_root>/corpora/<name>-<hash of the data settings>`."""
    if data.dir:
        return Path(data.dir)
    sources = [s if s == STDLIB else str(Path(s).resolve()) for s in data.sources]
    settings = {"sources": sources, "tokenizer": data.tokenizer, "vocab_size": data.vocab_size,
                "gpt2_ranks": data.gpt2_ranks, "val_fraction": data.val_fraction,
                "max_bytes": data.max_bytes, "bpe_train_bytes": data.bpe_train_bytes}
    if data.tokenizer == "pretrained":  # only then: other corpora keep their directories
        settings["pretrained"] = str(Path(pretrained).resolve())
    key = json.dumps(settings, sort_keys=True)
    name = "stdlib" if sources == [STDLIB] else Path(sources[0]).name or "corpus"
    digest = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    return Path(cache_root) / "corpora" / f"{name}-{data.tokenizer}-{digest}"


def ensure_corpus(data: DataConfig, cache_root: Path, progress: Progress | None = None,
                  pretrained: str = "") -> CorpusInfo:
    """Prepare the corpus of `data` (or reuse it when it is already prepared with the same settings).
    `pretrained`: model.pretrained, whose tokenizer data.tokenizer = "pretrained" uses."""
    return prepare_corpus(data.sources, corpus_dir(data, cache_root, pretrained), tokenizer=data.tokenizer,
                          vocab_size=data.vocab_size, gpt2_ranks=data.gpt2_ranks, val_fraction=data.val_fraction,
                          seed=SPLIT_SEED, bpe_train_bytes=data.bpe_train_bytes, max_bytes=data.max_bytes,
                          pretrained=pretrained, progress=progress)


def ensure_corpus_for(cfg: Config, cache_root: Path, progress: Progress | None = None) -> CorpusInfo:
    """The corpus a run of `cfg` trains on: text (train.objective = "lm"), or records (conversations for
    "sft", preference pairs for "dpo" and "reward", prompts for "grpo" and "ppo")."""
    pretrained = cfg.model.pretrained
    if cfg.train.objective == "distill" and not pretrained:  # the student reads the teacher's tokens
        pretrained = cfg.distill.teacher
    conversations = cfg.train.objective == "distill" and cfg.distill.data == "conversations"
    if cfg.train.objective in ("sft", "dpo", "reward", "grpo", "ppo") or conversations:
        return ensure_sft_corpus(cfg.data, cache_root, progress, pretrained,
                                 checkpoint_tokenizer(cfg.checkpoint.load) if cfg.data.tokenizer != "pretrained" else "")
    return ensure_corpus(cfg.data, cache_root, progress, pretrained)


def checkpoint_tokenizer(load: str) -> str:
    """The tokenizer directory of the run that checkpoint.load (a run or checkpoint directory) points
    into, or "": fine-tuning a megaloom checkpoint tokenizes with the tokenizer it was trained with."""
    if not load:
        return ""
    path = Path(load)
    for run in (path, path.parent.parent):  # RUN, or RUN/checkpoints/step_N
        if (run / "tokenizer" / "tokenizer_meta.json").is_file():
            return str(run / "tokenizer")
    return ""


def sft_corpus_dir(data: DataConfig, cache_root: Path, pretrained: str = "", tokenizer_dir: str = "") -> Path:
    """`data.dir` if set, else `<cache_root>/corpora/<name>-sft-<hash of the data settings>`; the chat
    template file's text is part of the key, so editing it prepares anew."""
    if data.dir:
        return Path(data.dir)
    sources = [str(Path(s).resolve()) for s in data.sources]
    template = Path(data.chat_template)
    settings = {"sources": sources, "tokenizer": data.tokenizer, "vocab_size": data.vocab_size,
                "gpt2_ranks": data.gpt2_ranks, "val_fraction": data.val_fraction, "max_bytes": data.max_bytes,
                "bpe_train_bytes": data.bpe_train_bytes, "format": data.format, "train_on_prompt": data.train_on_prompt,
                "chat_template": template.read_text(encoding="utf-8") if data.chat_template and template.is_file() else "",
                "pretrained": str(Path(pretrained).resolve()) if data.tokenizer == "pretrained" else "",
                "tokenizer_dir": files_hash(Path(tokenizer_dir)) if tokenizer_dir else ""}
    digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=6).hexdigest()
    kind = "checkpoint" if tokenizer_dir else data.tokenizer
    return Path(cache_root) / "corpora" / f"{Path(sources[0]).stem or 'sft'}-sft-{kind}-{digest}"


def ensure_sft_corpus(data: DataConfig, cache_root: Path, progress: Progress | None = None,
                      pretrained: str = "", tokenizer_dir: str = "") -> CorpusInfo:
    """Prepare the SFT corpus of `data` (or reuse it when it is already prepared with the same settings);
    `tokenizer_dir`: the fine-tuned checkpoint's own tokenizer instead of data.tokenizer."""
    return prepare_sft_corpus(data.sources, sft_corpus_dir(data, cache_root, pretrained, tokenizer_dir), fmt=data.format,
                              tokenizer=data.tokenizer, vocab_size=data.vocab_size, gpt2_ranks=data.gpt2_ranks,
                              val_fraction=data.val_fraction, seed=SPLIT_SEED, bpe_train_bytes=data.bpe_train_bytes,
                              max_bytes=data.max_bytes, chat_template=data.chat_template,
                              train_on_prompt=data.train_on_prompt, pretrained=pretrained,
                              tokenizer_dir=tokenizer_dir, progress=progress)
