"""One tokenizer interface over two libraries: HF `tokenizers` (our own byte-level BPE) and
`tiktoken` (GPT-2's published BPE). Neither algorithm is re-implemented here."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken
import tiktoken.load
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from megaloom.data.sources import DataError

EOS_TOKEN = "<|endoftext|>"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_FETCH = (
    "pip download --no-deps --no-binary openai-whisper openai-whisper && "
    "tar -xzf openai?whisper-*.tar.gz --strip-components=3 --wildcards "
    "'*/whisper/assets/gpt2.tiktoken'"
)
MIN_BPE_VOCAB = 256 + 1  # every byte, plus the eos token

_META_FILE = "tokenizer_meta.json"
_BPE_FILE = "tokenizer.json"
_RANKS_FILE = "gpt2.tiktoken"


class Tokenizer:
    """A trained tokenizer; `encode` never adds special tokens, documents are joined by eos."""

    def __init__(self, backend: HFTokenizer | tiktoken.Encoding, ranks_path: Path | None = None):
        self._backend = backend
        # Kept so that save() can copy the ranks: tiktoken cannot serialize an Encoding.
        self._ranks_path = ranks_path
        if isinstance(backend, HFTokenizer):
            self.kind = "bpe"
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            eos = backend.token_to_id(EOS_TOKEN)
            if eos is None:
                raise DataError(
                    f"tokenizer: the BPE tokenizer has no {EOS_TOKEN!r} token; re-run prepare"
                )
            self.eos_id = eos
            # Text that happens to contain "<|endoftext|>" is data, not a document boundary;
            # only prepare_corpus decides where eos goes (tiktoken's encode_ordinary agrees).
            backend.encode_special_tokens = True
        else:
            self.kind = "gpt2"
            self.vocab_size = backend.n_vocab
            self.eos_id = backend.eot_token

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def encode(self, text: str) -> list[int]:
        if isinstance(self._backend, HFTokenizer):
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts; both libraries spread the batch over all cores."""
        texts = list(texts)
        if isinstance(self._backend, HFTokenizer):
            encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
            return [e.ids for e in encodings]
        return self._backend.encode_ordinary_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if isinstance(self._backend, HFTokenizer):
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._backend.decode(ids)

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer so that `load_tokenizer(directory)` restores it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self._backend, HFTokenizer):
            self._backend.save(str(directory / _BPE_FILE))
        else:
            assert self._ranks_path is not None  # set by every gpt2 constructor
            target = directory / _RANKS_FILE
            if self._ranks_path.resolve() != target.resolve():
                shutil.copyfile(self._ranks_path, target)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        (directory / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with `tokenizers`; same input, same tokenizer."""
    if vocab_size < MIN_BPE_VOCAB + 1:
        raise DataError(
            f"data.vocab_size: {vocab_size} is too small for byte-level BPE; "
            f"use at least {MIN_BPE_VOCAB + 1} (256 bytes + eos + 1 merge)"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 bytes up front: any input, even bytes never seen in training, stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)


def gpt2_tokenizer(ranks_path: str | Path) -> Tokenizer:
    """GPT-2's tokenizer from its tiktoken ranks file (`gpt2.tiktoken`, 50256 ranks)."""
    path = Path(ranks_path)
    if not str(ranks_path) or not path.is_file():
        raise DataError(
            f"data.gpt2_ranks: {str(ranks_path)!r} is not a file; it must point to GPT-2's "
            f"gpt2.tiktoken, which this puts in the current directory: {GPT2_FETCH}"
        )
    ranks = _load_ranks(path)
    encoding = tiktoken.Encoding(
        name=f"megaloom-gpt2-{len(ranks)}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        # GPT-2's eos follows its ranks (50256 for the real file); deriving it from the file
        # instead of hard-coding it lets tests use a small synthetic ranks file.
        special_tokens={EOS_TOKEN: len(ranks)},
        explicit_n_vocab=len(ranks) + 1,
    )
    return Tokenizer(encoding, ranks_path=path)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer written by `Tokenizer.save`."""
    directory = Path(directory)
    meta_path = directory / _META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"tokenizer: {str(directory)!r} holds no saved tokenizer ({_META_FILE} missing); "
            "run `megaloom data prepare`"
        )
    kind = json.loads(meta_path.read_text())["kind"]
    if kind == "bpe":
        return Tokenizer(HFTokenizer.from_file(str(directory / _BPE_FILE)))
    if kind == "gpt2":
        return gpt2_tokenizer(directory / _RANKS_FILE)
    raise DataError(f"tokenizer: unknown kind {kind!r} in {str(meta_path)!r}; re-run prepare")


def _load_ranks(path: Path) -> dict[bytes, int]:
    # tiktoken caches files by *path* in a temp dir; passing the content hash makes it
    # notice when a different file later sits at the same path instead of reusing stale ranks.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=digest)
    except ValueError as e:
        raise DataError(
            f"data.gpt2_ranks: {str(path)!r} is not a tiktoken ranks file ({e}); "
            f"fetch gpt2.tiktoken with: {GPT2_FETCH}"
        ) from None
    # tiktoken needs dense ranks and every single byte, or it fails later with a panic.
    dense = sorted(ranks.values()) == list(range(len(ranks)))
    if not dense or any(bytes([b]) not in ranks for b in range(256)):
        raise DataError(
            f"data.gpt2_ranks: {str(path)!r} needs ranks 0..n-1 covering all 256 bytes; "
            f"fetch GPT-2's gpt2.tiktoken with: {GPT2_FETCH}"
        )
    return ranks
