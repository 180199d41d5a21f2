"""Supervised fine-tuning data: conversations in JSONL or Parquet files -> rendered with the chat
template -> a prepared corpus of token files with a loss mask.

Records are `{"messages": [{"role": ..., "content": ...}, ...]}` (format "chat") or `{"prompt": ...,
"response": ...}` (format "prompt_response", optionally with "system"), one JSON object per line, or
the same fields as columns of a Parquet file (as the `datasets` library writes them). Preference pairs
(DPO, reward models) are `{"prompt": ..., "chosen": ..., "rejected": ...}` (format "preference"): the
prompt a string or chat messages, each response a string or assistant messages (TRL's conversational
form); a pair becomes two conversations, the chosen one then the rejected one, adjacent in the same
split. Prompts for reinforcement learning (GRPO) are `{"prompt": ..., <fields the reward reads>}` (format
"prompt"): the prompt rendered with the generation prompt (the assistant's turn opened), and each record
kept whole in `{split}.records.jsonl` for the reward. The format is recognised from each record's fields
unless `data.format` names it.

The prepared corpus has the layout of a pretraining corpus (`prepare.py`: train.bin / val.bin token
files, document index, tokenizer/, meta.json, built in a temp dir and renamed into place, the split a
pure function of each record's key) plus `train.mask.bin` / `val.mask.bin`: one byte per token, 1 where
the loss counts it (the assistant's tokens, or every token with data.train_on_prompt). One document is
one conversation; no eos is added: the template closes every turn itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megaloom.data.chat import ChatTemplate, Message, load_template, template_variables, tokenize_conversation
from megaloom.data.prepare import (
    FORMAT_VERSION,
    CorpusInfo,
    Progress,
    build_once,
    is_validation,
)
from megaloom.data.sources import DataError
from megaloom.data.tokenizer import Tokenizer, gpt2_tokenizer, load_tokenizer, pretrained_tokenizer, train_bpe

FORMATS = ("auto", "chat", "prompt_response", "preference", "prompt")
_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Conversation:
    """One SFT record. `key` (file:line or file:row) is stable across runs; the train/val split hashes it."""

    key: str
    messages: tuple[Message, ...]
    rejected: tuple[Message, ...] | None = None  # a preference pair: `messages` ends with the chosen response
    margin: float | None = None  # a pair's optional "margin" field (reward models' loss, Touvron et al. 2023)
    record: dict | None = None  # a prompt to generate from (format "prompt"): the whole record, for the reward

    def text(self) -> str:
        return "\n".join(f"{m['role']}\n{m['content']}" for m in self.messages + (self.rejected or ())[-1:])

    def conversations(self) -> tuple[tuple[Message, ...], ...]:
        """What is tokenized: the conversation, or a pair's chosen then rejected conversation."""
        return (self.messages,) if self.rejected is None else (self.messages, self.rejected)


def iter_conversations(sources: list[str], fmt: str = "auto") -> Iterator[Conversation]:
    """The records of every source (files, or directories of .jsonl / .parquet files), in a fixed order."""
    if fmt not in FORMATS:
        raise DataError(f"data.format = {fmt!r} is not one of {' | '.join(FORMATS)}")
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data.sources: {source!r} does not exist; give .jsonl or .parquet files of conversations")
        files = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise DataError(f"data.sources: the directory {source!r} holds no .jsonl or .parquet file")
        for f in files:
            yield from _iter_file(f, fmt)


def _iter_file(path: Path, fmt: str) -> Iterator[Conversation]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield _conversation(record, f"{path}:{row}", fmt)
                row += 1
        return
    if path.suffix != ".jsonl":
        raise DataError(f"data.sources: {str(path)!r} is neither .jsonl nor .parquet; SFT reads conversations "
                        "from JSON lines or Parquet files")
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"data.sources: {where} is not a UTF-8 JSON object ({e})") from None
            yield _conversation(record, where, fmt)


def _conversation(record: Any, where: str, fmt: str) -> Conversation:
    fields = sorted(record) if isinstance(record, dict) else []
    if fmt == "auto":
        fmt = ("chat" if "messages" in fields else "prompt_response" if {"prompt", "response"} <= set(fields)
               else "preference" if {"prompt", "chosen", "rejected"} <= set(fields)
               else "prompt" if "prompt" in fields else "")
    if fmt == "preference":
        return _pair(record, where)
    if fmt == "prompt":
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if isinstance(prompt, str):
            return Conversation(where, ({"role": "user", "content": prompt},), record=record)
        if isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
            return Conversation(where, tuple(dict(m) for m in prompt), record=record)
        raise DataError(f"data.sources: {where} needs \"prompt\" as a string or a non-empty list of "
                        "{\"role\": str, \"content\": str} objects (data.format = \"prompt\")")
    if fmt == "chat":
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
            raise DataError(f"data.sources: {where} needs \"messages\": a non-empty list of {{\"role\": str, "
                            "\"content\": str}} objects (data.format = \"chat\")")
        return Conversation(where, tuple(dict(m) for m in messages))
    if fmt == "prompt_response":
        if not all(isinstance(record.get(k) if isinstance(record, dict) else None, str) for k in ("prompt", "response")):
            raise DataError(f"data.sources: {where} needs string fields \"prompt\" and \"response\" "
                            "(data.format = \"prompt_response\")")
        system = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
        return Conversation(where, (*system, {"role": "user", "content": record["prompt"]},
                                    {"role": "assistant", "content": record["response"]}))
    raise DataError(f"data.sources: {where} has fields {fields}, neither \"messages\" (chat), \"prompt\" and "
                    "\"response\" nor \"prompt\", \"chosen\" and \"rejected\" (preference); write records in one "
                    "of those formats or set data.format")


def _pair(record: Any, where: str) -> Conversation:
    """A preference record: the prompt (a string: one user turn, or messages) followed by each response (a
    string: one assistant turn, or messages)."""
    def turns(value: Any, role: str, field: str) -> tuple[Message, ...]:
        if isinstance(value, str):
            return ({"role": role, "content": value},)
        if isinstance(value, list) and value and all(_is_message(m) for m in value):
            return tuple(dict(m) for m in value)
        raise DataError(f"data.sources: {where} needs \"{field}\" as a string or a non-empty list of "
                        "{\"role\": str, \"content\": str} objects (data.format = \"preference\")")

    if not isinstance(record, dict):
        raise DataError(f"data.sources: {where} is not a JSON object with \"prompt\", \"chosen\", \"rejected\"")
    prompt = turns(record.get("prompt"), "user", "prompt")
    chosen = turns(record.get("chosen"), "assistant", "chosen")
    rejected = turns(record.get("rejected"), "assistant", "rejected")
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"data.sources: {where} has \"margin\": {margin!r}; it must be a number or left out")
    return Conversation(where, prompt + chosen, prompt + rejected, None if margin is None else float(margin))


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def prepare_sft_corpus(sources: list[str], out_dir: Path, *, fmt: str = "auto", tokenizer: str = "bpe",
                       vocab_size: int = 4096, gpt2_ranks: str = "", val_fraction: float = 0.005, seed: int = 0,
                       bpe_train_bytes: int = 8_000_000, max_bytes: int = 0, chat_template: str = "",
                       train_on_prompt: bool = False, pretrained: str = "", tokenizer_dir: str = "",
                       progress: Progress | None = None) -> CorpusInfo:
    """Prepare (or reuse, when already prepared with identical settings) an SFT corpus in out_dir.
    tokenizer = "pretrained": the tokenizer of `pretrained` (a Hugging Face directory or a .gguf file),
    with its own chat template. `tokenizer_dir`: a saved tokenizer (the run directory of the checkpoint
    being fine-tuned), used instead of `tokenizer`."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction: {val_fraction} is outside [0, 1); use e.g. 0.05")
    settings = {
        "format_version": FORMAT_VERSION, "objective": "sft", "format": fmt,
        "sources": [str(Path(s).resolve()) for s in sources],
        "tokenizer": tokenizer, "vocab_size": int(vocab_size),
        "gpt2_ranks": str(Path(gpt2_ranks).resolve()) if gpt2_ranks else "", "val_fraction": float(val_fraction),
        "seed": int(seed), "bpe_train_bytes": int(bpe_train_bytes), "max_bytes": int(max_bytes),
        "chat_template": load_template(chat_template, None).text if chat_template else "",
        "pretrained": str(Path(pretrained).resolve()) if tokenizer == "pretrained" else "",
        "tokenizer_dir": files_hash(Path(tokenizer_dir)) if tokenizer_dir else "",
        "train_on_prompt": bool(train_on_prompt),
    }
    say = progress or (lambda _msg: None)

    def build(tmp: Path) -> CorpusInfo:
        say(f"reading conversations from {', '.join(sources)}")
        records = list(_limited(iter_conversations(sources, fmt), max_bytes))
        if not records:
            raise DataError(f"data.sources: {sources!r} hold no conversations")
        pairs = {r.rejected is not None for r in records}
        prompts = {r.record is not None for r in records}
        if len(pairs) > 1 or len(prompts) > 1:
            first = next(r for r in records if r.rejected is not None or r.record is not None)
            kind = "preference pairs" if first.rejected is not None else "prompts"
            raise DataError(f"data.sources: {kind} ({first.key}) and other records are mixed; give DPO and reward "
                            "models pairs only, GRPO prompts only, SFT conversations only")
        is_val = _split(records, seed, val_fraction)
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else \
            _tokenizer(settings, [r for r, v in zip(records, is_val) if not v], say)
        template = load_template(chat_template, tok)
        tok.chat_template = template.text  # the run's tokenizer keeps the template it was fine-tuned with
        tok.save(tmp / "tokenizer")
        (tmp / "tokenizer" / "chat_template.jinja").write_text(template.text, encoding="utf-8")
        say(f"rendering {len(records)} conversations with {template.name}")
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        counts = _encode(tmp, tok, template, dtype, records, is_val, train_on_prompt)
        return CorpusInfo(directory=tmp, tokenizer=tok.kind, vocab_size=tok.vocab_size,
                          eos_id=tok.eos_id, dtype=np.dtype(dtype).name, sources=list(sources),
                          group=2 if True in pairs else 1, prompts=True in prompts, **counts)

    return build_once(Path(out_dir), settings, build)


def files_hash(directory: Path) -> str:
    """What a saved tokenizer is: its files' contents (not where they are)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _limited(records: Iterator[Conversation], max_bytes: int) -> Iterator[Conversation]:
    total = 0
    for r in records:
        if max_bytes and total >= max_bytes:
            return
        total += len(r.text().encode())
        yield r


def _split(records: list[Conversation], seed: int, val_fraction: float) -> list[bool]:
    """The pretraining split rule (a hash of each key); with no validation record, the last train record
    moves there when there are two or more, so a run can report a validation loss."""
    is_val = [is_validation(r.key, seed, val_fraction) for r in records]
    if all(is_val):
        raise DataError(f"data.val_fraction: {val_fraction} puts all {len(records)} conversations into validation; "
                        "lower it or add data")
    if not any(is_val) and len(records) >= 2:
        is_val[-1] = True
    return is_val


def _tokenizer(settings: dict, train: list[Conversation], say: Progress) -> Tokenizer:
    if settings["tokenizer"] == "gpt2":
        return gpt2_tokenizer(settings["gpt2_ranks"])
    if settings["tokenizer"] == "pretrained":
        if not settings["pretrained"]:
            raise DataError('data.tokenizer = "pretrained" needs model.pretrained, the model whose tokenizer it is')
        return pretrained_tokenizer(settings["pretrained"])
    if settings["tokenizer"] != "bpe":
        raise DataError(f"data.tokenizer = {settings['tokenizer']!r} is unknown; use \"bpe\", \"gpt2\" or "
                        "\"pretrained\"")
    texts, used = [], 0
    for r in train:  # the first bpe_train_bytes of the training conversations' text
        if used >= settings["bpe_train_bytes"]:
            break
        texts.append(r.text())
        used += len(texts[-1].encode())
    say(f"training BPE (vocab {settings['vocab_size']}) on {used / 1e6:.1f} MB of conversations")
    return train_bpe(texts, settings["vocab_size"])


def _encode(tmp: Path, tok: Tokenizer, template: ChatTemplate, dtype: type, records: list[Conversation],
            is_val: list[bool], train_on_prompt: bool) -> dict[str, int]:
    starts: dict[str, list[int]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    margins: dict[str, list[float]] = {"train": [], "val": []}  # per pair, 0 where a record gives none
    prompt_records: dict[str, list[str]] = {"train": [], "val": []}
    with contextlib.ExitStack() as stack:
        files = {(split, kind): stack.enter_context(open(tmp / f"{split}{kind}.bin", "wb"))
                 for split, kind in itertools.product(sizes, ("", ".mask"))}
        for record, val in zip(records, is_val):
            split = "val" if val else "train"
            if record.rejected is not None:
                margins[split].append(record.margin or 0.0)
            if record.record is not None:  # a prompt: the assistant's turn opened, nothing to score yet
                text = template.render(record.messages, True, template_variables(tok))
                ids = tok.encode_special(text)
                np.asarray(ids, dtype=dtype).tofile(files[split, ""])
                np.zeros(len(ids), dtype=np.uint8).tofile(files[split, ".mask"])
                prompt_records[split].append(json.dumps(record.record, ensure_ascii=False))
                starts[split].append(sizes[split])
                sizes[split] += len(ids)
                continue
            for messages in record.conversations():
                ids, mask = tokenize_conversation(tok, template, messages, train_on_prompt=train_on_prompt,
                                                  where=record.key)
                np.asarray(ids, dtype=dtype).tofile(files[split, ""])
                np.asarray(mask, dtype=np.uint8).tofile(files[split, ".mask"])
                starts[split].append(sizes[split])
                sizes[split] += len(ids)
    for split, offsets in starts.items():
        np.save(tmp / f"{split}.idx.npy", np.asarray(offsets, dtype=np.int64))
        if any(r.margin is not None for r in records):
            np.save(tmp / f"{split}.margin.npy", np.asarray(margins[split], dtype=np.float32))
        if any(r.record is not None for r in records):
            (tmp / f"{split}.records.jsonl").write_text("".join(line + "\n" for line in prompt_records[split]),
                                                        encoding="utf-8")
    return {"train_tokens": sizes["train"], "val_tokens": sizes["val"], "train_docs": len(starts["train"]),
            "val_docs": len(starts["val"])}
