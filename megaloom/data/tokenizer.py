"""One tokenizer interface over two libraries: HF `tokenizers` (our own byte-level BPE, and the
tokenizer a pretrained model ships: its tokenizer.json, or the vocabulary of a .gguf file) and
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
# a pretrained model's own tokenizer files, kept verbatim so that a Hugging Face export carries them
HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


class Tokenizer:
    """A trained tokenizer; `encode` never adds special tokens, documents are joined by eos.

    `bos_id` (None where there is none), `eos_id` and `chat_template` (the Jinja chat template of a
    pretrained model, else None) are what generation and evaluation need besides encode and decode."""

    def __init__(self, backend: HFTokenizer | tiktoken.Encoding, ranks_path: Path | None = None,
                 pretrained: dict | None = None):
        self._backend = backend
        # Kept so that save() can copy the ranks: tiktoken cannot serialize an Encoding.
        self._ranks_path = ranks_path
        self._special_backend: HFTokenizer | None = None  # built by encode_special on first use
        self.bos_id: int | None = None
        self.chat_template: str | None = None
        self.hf_files: dict[str, str] = {}  # a pretrained model's tokenizer files (HF_TOKENIZER_FILES), verbatim
        if pretrained is not None:  # a model's own tokenizer (`pretrained_tokenizer`)
            assert isinstance(backend, HFTokenizer)
            self.kind = "pretrained"
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            self.eos_id, self.bos_id = pretrained["eos_id"], pretrained.get("bos_id")
            self.chat_template = pretrained.get("chat_template")
            self.hf_files = dict(pretrained.get("hf_files") or {})
            backend.encode_special_tokens = True  # as for our BPE: markup in the data is text (encode_special parses it)
        elif isinstance(backend, HFTokenizer):
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

    @property
    def backend(self) -> HFTokenizer | tiktoken.Encoding:
        """The library's tokenizer object (a `tokenizers.Tokenizer` or a `tiktoken.Encoding`)."""
        return self._backend

    def encode(self, text: str) -> list[int]:
        if isinstance(self._backend, HFTokenizer):
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode_ordinary(text)

    def encode_special(self, text: str) -> list[int]:
        """Encode text in which special tokens are written out as markup (a rendered chat template:
        "<|im_end|>", the eos token) into their ids, as transformers' apply_chat_template does; `encode`
        keeps such strings as plain text."""
        if isinstance(self._backend, HFTokenizer):
            if self._special_backend is None:  # a copy that parses special tokens; the original never does
                self._special_backend = HFTokenizer.from_str(self._backend.to_str())
                self._special_backend.encode_special_tokens = False
            return self._special_backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text, allowed_special="all", disallowed_special=())

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
        if self.kind == "pretrained":
            meta.update(bos_id=self.bos_id, chat_template=self.chat_template)
            for name, text in self.hf_files.items():
                (directory / name).write_text(text, encoding="utf-8")
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


def pretrained_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a pretrained model ships: a Hugging Face directory's tokenizer.json with the special
    tokens and chat template of its tokenizer_config.json (or chat_template.jinja), or the vocabulary of a
    .gguf file, turned into a `tokenizers` object by transformers' GGUF converter."""
    path = Path(path)
    if str(path).lower().endswith(".gguf"):
        return _gguf_tokenizer(path)
    if not (path / _BPE_FILE).is_file():
        raise DataError(f"model.pretrained: '{path}' has no {_BPE_FILE}; megaloom reads a model's fast "
                        "(tokenizers) tokenizer, which transformers' save_pretrained writes")
    backend = HFTokenizer.from_file(str(path / _BPE_FILE))
    files = {n: (path / n).read_text(encoding="utf-8") for n in HF_TOKENIZER_FILES if (path / n).is_file()}
    config = json.loads(files.get("tokenizer_config.json", "{}"))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if "chat_template.jinja" in files:
        template = files["chat_template.jinja"]
    elif "chat_template.json" in files:
        template = json.loads(files["chat_template.json"]).get("chat_template")
    model_config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}

    def token_id(name: str) -> int | None:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and backend.token_to_id(token) is not None:
            return backend.token_to_id(token)
        fallback = model_config.get(f"{name}_id")  # config.json's id (a list: the first)
        return fallback[0] if isinstance(fallback, list) else fallback

    eos = token_id("eos_token")
    if eos is None:
        raise DataError(f"model.pretrained: '{path}' names no eos token (tokenizer_config.json eos_token or "
                        "config.json eos_token_id); megaloom ends every document with it")
    return Tokenizer(backend, pretrained={"eos_id": eos, "bos_id": token_id("bos_token"), "chat_template": template,
                                          "hf_files": files})


def _gguf_tokenizer(path: Path) -> Tokenizer:
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, vocab, config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, vocab)
    ids = {name: backend.token_to_id(config[name]) if config.get(name) else None
           for name in ("bos_token", "eos_token")}
    if ids["eos_token"] is None:
        raise DataError(f"model.pretrained: '{path}' names no eos token; megaloom ends every document with it")
    # a tokenizer_config.json for Hugging Face exports: the special tokens and flags the file states
    hf_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                 **{k: v for k, v in config.items() if v is not None and k != "chat_template"}}
    files = {"tokenizer_config.json": json.dumps(hf_config, indent=2) + "\n"}
    if config.get("chat_template"):
        files["chat_template.jinja"] = config["chat_template"]
    return Tokenizer(backend, pretrained={"eos_id": ids["eos_token"], "bos_id": ids["bos_token"],
                                          "chat_template": config.get("chat_template"), "hf_files": files})


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer written by `Tokenizer.save`."""
    directory = Path(directory)
    meta_path = directory / _META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"tokenizer: {str(directory)!r} holds no saved tokenizer ({_META_FILE} missing); "
            "run `megaloom data prepare`"
        )
    meta = json.loads(meta_path.read_text())
    kind = meta["kind"]
    if kind in ("bpe", "gpt2"):
        tok = Tokenizer(HFTokenizer.from_file(str(directory / _BPE_FILE))) if kind == "bpe" else \
            gpt2_tokenizer(directory / _RANKS_FILE)
        if (directory / "chat_template.jinja").is_file():  # the template an SFT run was trained with
            tok.chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return tok
    if kind == "pretrained":
        files = {n: (directory / n).read_text(encoding="utf-8") for n in HF_TOKENIZER_FILES if (directory / n).is_file()}
        return Tokenizer(HFTokenizer.from_file(str(directory / _BPE_FILE)), pretrained={**meta, "hf_files": files})
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
