"""Unit tests of megaloom.data: sources, tokenizers, corpus preparation and the batch loader."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megaloom.data import (
    STDLIB,
    BatchLoader,
    DataError,
    TokenDataset,
    eval_batches,
    gpt2_tokenizer,
    iter_documents,
    load_corpus_info,
    load_tokenizer,
    prepare_corpus,
    train_bpe,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLES = [
    "def f(x):\n\treturn {'a': [x ** 2, None]}  # comment\r\n",
    "héllo wörld — naïve café; 中文字符; русский текст",
    "emoji 🎉🐍👩‍👩‍👧 and flags 🇳🇿, zero-width\u200bjoiner",
    "   leading and trailing spaces   \n\n\n",
    "literal <|endoftext|> inside a document",
    "",
]
# Few enough bytes to keep the whole file fast, enough for BPE to learn real merges.
SMALL = {"vocab_size": 400, "max_bytes": 300_000, "bpe_train_bytes": 200_000}


def split_hash(s: str) -> float:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") / 2**64


def write_ranks(path: Path, merges: list[bytes]) -> Path:
    """A tiktoken-format ranks file: the 256 single bytes, then `merges` in rank order."""
    tokens = [bytes([b]) for b in range(256)] + merges
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_docs(directory: Path, texts: dict[str, str]) -> Path:
    for name, text in texts.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def split_texts(corpus: Path, split: str) -> list[str]:
    """Decode each document of a prepared split (dropping its trailing eos)."""
    tok = load_tokenizer(corpus / "tokenizer")
    ds = TokenDataset(corpus, split)
    ends = [*ds.doc_starts[1:].tolist(), len(ds)]  # each doc ends with its eos at end - 1
    return [tok.decode(ds.tokens[s : e - 1]) for s, e in zip(ds.doc_starts, ends, strict=True)]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "corpus"
    prepare_corpus([STDLIB], out, val_fraction=0.1, **SMALL)
    return out


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    """~3000 tokens with a byte-level synthetic GPT-2 vocab: small enough for many epochs."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefgh \n"), size=3000))
    write_docs(root / "docs", {"a.txt": text})
    ranks = write_ranks(root / "ranks.tiktoken", [b"ab"])
    out = root / "corpus"
    # val_fraction=0: with a random tmp path in the key, the only doc could land in validation.
    gpt2 = {"tokenizer": "gpt2", "gpt2_ranks": str(ranks)}
    prepare_corpus([str(root / "docs")], out, val_fraction=0, **gpt2)
    return out


def test_text_file_and_directory_sources(tmp_path):
    write_docs(tmp_path / "d", {"b.txt": "bee", "a/z.py": "zed", "a.md": "ay", "empty.txt": ""})
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "d" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    write_docs(tmp_path / "d" / ".git", {"HEAD": "ref: main"})
    docs = list(iter_documents([str(tmp_path / "d"), str(tmp_path / "d" / "b.txt")]))
    assert [x.text for x in docs] == ["ay", "zed", "bee", "bee"]  # sorted, text files only
    names = ("a.md", "a/z.py", "b.txt", "b.txt")
    assert [x.key for x in docs] == [str(tmp_path / "d" / n) for n in names]
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe")  # skipped in a directory, an error when named
    with pytest.raises(DataError, match=r"data\.sources: '.*x\.txt' is not UTF-8 text"):
        list(iter_documents([str(tmp_path / "x.txt")]))


def test_jsonl_source(tmp_path):
    rows = [{"text": "one"}, {"text": ""}, {"text": "three", "id": 3}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = list(iter_documents([str(path)]))
    assert [(d.key, d.text) for d in docs] == [(f"{path}:1", "one"), (f"{path}:3", "three")]


@pytest.mark.parametrize("bad", ["not json", '{"txt": "x"}', '{"text": 5}', '["text"]'])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + bad + "\n")
    with pytest.raises(DataError) as err:
        list(iter_documents([str(path)]))
    msg = str(err.value)
    assert msg.startswith(f"data.sources: {str(path)!r} line 2 ") and '"text"' in msg


def test_missing_source_error(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError) as err:
        list(iter_documents([missing]))
    assert str(err.value) == (
        f"data.sources: {missing!r} does not exist; "
        'give a file, a directory, a .jsonl file, or "stdlib"'
    )
    assert isinstance(err.value, ValueError)


def test_stdlib_source():
    docs = list(itertools.islice(iter_documents([STDLIB]), 300))
    assert len(docs) == 300 and all(d.key.startswith("stdlib/") and d.text for d in docs)
    keys = [d.key for d in docs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(k.endswith(".py") and "site-packages/" not in k for k in keys)


@pytest.fixture(scope="module")
def bpe(small_corpus):
    return load_tokenizer(small_corpus / "tokenizer")


def test_bpe_round_trip_and_save_load(bpe, tmp_path):
    assert (bpe.kind, bpe.vocab_size) == ("bpe", 400)
    for text in SAMPLES:
        assert bpe.decode(bpe.encode(text)) == text
    # A literal eos string in a document is text, not a document boundary.
    assert bpe.eos_id not in bpe.encode(SAMPLES[4])
    assert bpe.decode([bpe.eos_id]) == "<|endoftext|>"
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(t) for t in SAMPLES]
    bpe.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.encode_batch(SAMPLES) == bpe.encode_batch(SAMPLES)
    assert (again.vocab_size, again.eos_id) == (bpe.vocab_size, bpe.eos_id)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_and_is_deterministic():
    texts = [d.text for d in itertools.islice(iter_documents([STDLIB]), 20)]
    a, b = train_bpe(texts, 300), train_bpe(iter(texts), 300)
    assert a.encode_batch(SAMPLES) == b.encode_batch(SAMPLES)
    assert len(a.encode(texts[0])) < len(texts[0].encode()) / 1.3
    with pytest.raises(DataError, match=r"data\.vocab_size: 257 is too small .* at least 258"):
        train_bpe(["abc"], 257)


def test_gpt2_tokenizer_with_synthetic_ranks(tmp_path):
    ranks = write_ranks(tmp_path / "r.tiktoken", [b"he", b"ll", b"hell", b"hello", b" w"])
    tok = gpt2_tokenizer(ranks)
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("gpt2", 262, 261)
    assert tok.encode("hello world") == [259, 260, *b"orld"]
    assert tok.eos_id not in tok.encode(SAMPLES[4])
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "saved")
    ranks.unlink()  # the saved copy must be self-contained
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES) and again.eos_id == 261


def test_gpt2_missing_ranks_file_message(tmp_path):
    with pytest.raises(DataError) as err:
        gpt2_tokenizer(tmp_path / "gpt2.tiktoken")
    msg = str(err.value)
    assert msg.startswith("data.gpt2_ranks: ") and "\n" not in msg
    assert "pip download --no-deps --no-binary openai-whisper openai-whisper" in msg
    assert "--strip-components=3" in msg and "'*/whisper/assets/gpt2.tiktoken'" in msg
    (tmp_path / "gpt2.tiktoken").write_text("YQ== 0\n")  # only the byte "a"
    with pytest.raises(DataError, match=r"data\.gpt2_ranks: .* covering all 256 bytes"):
        gpt2_tokenizer(tmp_path / "gpt2.tiktoken")


def test_prepared_layout(small_corpus):
    info = load_corpus_info(small_corpus)
    assert (info.tokenizer, info.vocab_size, info.dtype) == ("bpe", 400, "uint16")
    assert info.sources == [STDLIB]
    assert info.train_docs > 10 and info.val_docs >= 1
    for split in ("train", "val"):
        n_tokens, n_docs = getattr(info, f"{split}_tokens"), getattr(info, f"{split}_docs")
        tokens = np.fromfile(small_corpus / f"{split}.bin", dtype=np.uint16)
        starts = np.load(small_corpus / f"{split}.idx.npy")
        assert len(tokens) == n_tokens and len(starts) == n_docs and starts.dtype == np.int64
        assert starts[0] == 0 and (tokens[starts[1:] - 1] == info.eos_id).all()
        assert tokens[-1] == info.eos_id
    meta = json.loads((small_corpus / "meta.json").read_text())
    assert len(meta["settings_hash"]) == 16 and meta["settings"]["format_version"] >= 1


def test_prepare_is_deterministic_across_processes(small_corpus, tmp_path):
    # A fresh interpreter: hash seeds and thread scheduling differ, output must not.
    out = tmp_path / "again"
    code = (
        "import sys; from pathlib import Path; from megaloom.data import prepare_corpus; "
        f"prepare_corpus(['stdlib'], Path(sys.argv[1]), val_fraction=0.1, **{SMALL!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=REPO)
    for name in ("train.bin", "val.bin", "train.idx.npy", "val.idx.npy"):
        assert (out / name).read_bytes() == (small_corpus / name).read_bytes()


def test_prepare_reuses_identical_settings_and_refuses_others(tmp_path):
    src = write_docs(tmp_path / "src", {f"{i}.txt": f"document {i} " * 20 for i in range(5)})
    out = tmp_path / "corpus"
    kwargs = {"vocab_size": 300, "val_fraction": 0.3}
    first = prepare_corpus([str(src)], out, **kwargs)
    mtime = (out / "train.bin").stat().st_mtime_ns
    messages: list[str] = []
    second = prepare_corpus([str(src)], out, progress=messages.append, **kwargs)
    assert second == first and messages == []
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("corpus.tmp-*"))
    with pytest.raises(DataError) as err:
        prepare_corpus([str(src)], out, vocab_size=301, val_fraction=0.3)
    assert str(err.value).startswith(f"data.dir: {str(out)!r} holds a corpus prepared with other")
    assert "choose another data.dir or delete it" in str(err.value)


def test_split_is_stable_when_documents_are_added(tmp_path):
    base = {f"a/{i:02d}.txt": f"original document number {i}" for i in range(40)}
    src = write_docs(tmp_path / "src", base)
    kwargs = {"vocab_size": 300, "val_fraction": 0.25, "seed": 7}
    before = prepare_corpus([str(src)], tmp_path / "c1", **kwargs)
    write_docs(src, {f"b/{i:02d}.txt": f"added document number {i}" for i in range(40)})
    after = prepare_corpus([str(src)], tmp_path / "c2", **kwargs)
    assert 0 < before.val_docs < 40 and after.train_docs + after.val_docs == 80
    for split in ("train", "val"):
        old, new = split_texts(tmp_path / "c1", split), split_texts(tmp_path / "c2", split)
        assert set(old) <= set(new)
        assert all(t.startswith("original") for t in old)
    # ... and it is exactly the documented rule.
    key_of = {text: str(src / name) for name, text in base.items()}
    expected = {t for t, k in key_of.items() if split_hash(f"7:{k}") < 0.25}
    assert set(split_texts(tmp_path / "c1", "val")) == expected


def test_empty_validation_takes_the_last_train_document(tmp_path):
    src = write_docs(tmp_path / "src", {f"{i}.txt": f"text {i} " * 10 for i in range(3)})
    info = prepare_corpus([str(src)], tmp_path / "c", vocab_size=300, val_fraction=0.0)
    assert (info.train_docs, info.val_docs) == (2, 1)
    assert split_texts(tmp_path / "c", "val") == ["text 2 " * 10]


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    # 256 bytes + 65280 two-byte merges = 65536 ranks, so eos = 65536 needs 32 bits.
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)][: 65536 - 256]
    ranks = write_ranks(tmp_path / "big.tiktoken", pairs)
    src = write_docs(tmp_path / "src", {"a.txt": "abc " * 50, "b.txt": "xyz " * 50})
    info = prepare_corpus(
        [str(src)], tmp_path / "c", tokenizer="gpt2", gpt2_ranks=str(ranks), val_fraction=0.0
    )
    assert (info.vocab_size, info.eos_id, info.dtype) == (65537, 65536, "uint32")
    assert TokenDataset(tmp_path / "c", "train").tokens[-1] == 65536
    texts = split_texts(tmp_path / "c", "train") + split_texts(tmp_path / "c", "val")
    assert sorted(texts) == ["abc " * 50, "xyz " * 50]


def test_prepare_gpt2_and_max_bytes(tmp_path):
    ranks = write_ranks(tmp_path / "r.tiktoken", [b"do", b"doc"])
    src = write_docs(tmp_path / "src", {f"{i:02d}.txt": "doc " * 25 for i in range(20)})
    info = prepare_corpus(
        [str(src)], tmp_path / "c", tokenizer="gpt2", gpt2_ranks=str(ranks), max_bytes=250
    )
    assert info.tokenizer == "gpt2" and info.dtype == "uint16"
    assert info.train_docs + info.val_docs == 3  # 100 bytes each; stops once 250 are read
    assert load_tokenizer(tmp_path / "c" / "tokenizer").encode("doc") == [257]


def test_prepare_errors(tmp_path):
    out = tmp_path / "c"
    with pytest.raises(DataError, match=r"^data\.gpt2_ranks: '' is not a file"):
        prepare_corpus([STDLIB], out, tokenizer="gpt2")
    with pytest.raises(DataError, match=r"^data\.tokenizer: 'wordpiece' is unknown"):
        prepare_corpus([STDLIB], out, tokenizer="wordpiece")
    with pytest.raises(DataError, match=r"^data\.sources: 'stdlib' is not a non-empty list"):
        prepare_corpus(STDLIB, out)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"^data\.val_fraction: 1\.0 is outside \[0, 1\)"):
        prepare_corpus([STDLIB], out, val_fraction=1.0)
    with pytest.raises(DataError, match=r"^data\.sources: .* does not exist"):
        prepare_corpus([str(tmp_path / "missing")], out)
    assert not out.exists() and not list(tmp_path.glob("c.tmp-*"))
    with pytest.raises(DataError) as err:
        load_corpus_info(out)
    assert str(err.value) == (
        f"data.dir: {str(out)!r} holds no prepared corpus (meta.json missing); "
        "run `megaloom data prepare`"
    )


def drain(loader: BatchLoader, steps: int) -> list[torch.Tensor]:
    return [loader.next_batch()[0] for _ in range(steps)]


def test_batches_are_shifted_windows_of_the_corpus(tiny_corpus):
    ds = TokenDataset(tiny_corpus, "train")
    loader = BatchLoader(ds, seq_len=16, batch_size=8, seed=3)
    windows = {ds.tokens[i * 16 : i * 16 + 17].tobytes(): i for i in range(loader.num_samples)}
    seen = []
    for _ in range(loader.steps_per_epoch):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            seen.append(windows[np.append(row_x, row_y[-1]).astype(ds.tokens.dtype).tobytes()])
    assert len(set(seen)) == len(seen) == loader.steps_per_epoch * 8  # no repeats in an epoch


def test_resume_matches_uninterrupted_run_across_epochs(tiny_corpus):
    ds = TokenDataset(tiny_corpus, "train")
    reference = BatchLoader(ds, 16, 8, seed=5)
    total = reference.steps_per_epoch * 2 + 3
    expected = drain(reference, total)
    first, cut = BatchLoader(ds, 16, 8, seed=5), reference.steps_per_epoch + 1
    got = drain(first, cut)
    state, resumed = first.state_dict(), BatchLoader(ds, 16, 8, seed=5)
    assert json.loads(json.dumps(state)) == state and state["epoch"] == 1
    resumed.load_state_dict(state)
    got += drain(resumed, total - cut)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not torch.equal(expected[0], expected[reference.steps_per_epoch])  # reshuffled


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_union_equals_single_rank_batch(tiny_corpus, dp_size):
    ds = TokenDataset(tiny_corpus, "train")
    single = BatchLoader(ds, 16, 8, seed=11)
    ranks = [BatchLoader(ds, 16, 8, seed=11, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for _ in range(single.steps_per_epoch + 2):
        parts = [r.next_batch() for r in ranks]
        x, y = single.next_batch()
        assert all(p[0].shape == (8 // dp_size, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert ranks[1].state_dict() == single.state_dict()


def test_loader_errors(tiny_corpus):
    ds = TokenDataset(tiny_corpus, "train")
    not_divisible = r"^train\.global_batch: 6 is not divisible by parallel\.dp=4"
    with pytest.raises(DataError, match=not_divisible):
        BatchLoader(ds, 16, 6, seed=0, dp_size=4)
    n = (len(ds) - 1) // 1024
    with pytest.raises(DataError) as err:
        BatchLoader(ds, 1024, 8, seed=0)
    assert f"({len(ds)} tokens, {n} windows of seq_len 1024) is too small" in str(err.value)
    state = BatchLoader(ds, 16, 8, seed=0).state_dict()
    with pytest.raises(DataError, match=r"seed=0 in the checkpoint but 1 now"):
        BatchLoader(ds, 16, 8, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match=r"seq_len=16 in the checkpoint but 32 now"):
        BatchLoader(ds, 32, 8, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match=r"^split: 'test' is unknown"):
        TokenDataset(tiny_corpus, "test")


def test_eval_batches(tiny_corpus):
    ds = TokenDataset(tiny_corpus, "train")
    assert len(batches := list(eval_batches(ds, 16, 4, 3))) == 3
    flat = torch.cat([x for x, _ in batches]).reshape(-1)
    assert torch.equal(flat, torch.from_numpy(ds.tokens[: 3 * 4 * 16].astype(np.int64)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, eval_batches(ds, 16, 4, 3)))
    n = (len(ds) - 1) // 512
    only = list(eval_batches(ds, 512, 64, 10))  # too short for a full batch: one partial one
    assert len(only) == 1 and only[0][0].shape == (n, 512)
    with pytest.raises(DataError, match=r"fewer than seq_len \+ 1"):
        next(eval_batches(ds, len(ds), 1, 1))
