"""The requests megaloom eval scores are the ones lm-evaluation-harness builds: rolling windows, the
context/continuation split of a choice, few-shot sampling and word counts, checked against lm_eval's own
functions on the same inputs (pure Python, no model)."""

import random

import pytest

from megaloom.eval.requests import (
    ChoiceItem,
    HarnessEncoder,
    Request,
    count_words,
    fewshot_contexts,
    model_input,
    rolling_token_windows,
)


def test_rolling_windows_equal_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(1000) for _ in range(rng.randrange(0, 70))]
        max_length = rng.randrange(1, 20)
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_length, 1)]
        ours = list(rolling_token_windows(tokens, 7, max_length))
        assert [(list(r.context), list(r.continuation)) for r in ours] == theirs
        # every token predicted exactly once, each input at most max_length tokens
        assert [t for r in ours for t in r.continuation] == tokens
        assert all(len(model_input(r, max_length)[0]) - 1 <= max_length for r in ours)


class _CharTokenizer:
    """One token per character, eos 0: enough to follow where the harness splits text."""

    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def _harness_pairs(pairs):
    """(context, continuation) token lists exactly as lm_eval's TemplateLM.loglikelihood builds them."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM

    class Recorder(TemplateLM):
        eot_token_id = 0

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return [ord(c) for c in string]

        def _loglikelihood_tokens(self, requests, **kwargs):
            self.seen = [(ctx, cont) for _, ctx, cont in requests]
            return []

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    lm = Recorder()
    lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    return lm.seen


def test_choice_split_and_trailing_whitespace_equal_lm_eval():
    pairs = [("Question: why?", " because"), ("ends in a space ", " A"), ("two newlines\n\n", " B"),
             ("tab\t", " x"), ("", " empty context"), ("", "\x00starts with the prefix token")]
    ours = [HarnessEncoder(_CharTokenizer()).pair(c, x) for c, x in pairs]
    assert [(list(r.context), list(r.continuation)) for r in ours] == _harness_pairs(pairs)
    assert ours[1].continuation[:2] == (ord(" "), ord(" "))  # the context's trailing space moved over


def test_fewshot_contexts_equal_lm_eval_sampler():
    """The harness's default sampler on the evaluated split: one Random(1234) over the whole file,
    sample(k + 1) per item, the item itself removed; duplicates of an item are never its examples."""
    from lm_eval.api.samplers import ContextSampler

    rng = random.Random(1)
    items = [ChoiceItem(f"q{i}:", ("a", "b", "c"), rng.randrange(3)) for i in range(12)]
    items.append(items[3])  # a duplicate line
    docs = [{"context": it.context, "choices": list(it.choices), "answer": it.answer} for it in items]
    for k in (1, 3, 5):
        sampler = ContextSampler(docs, rnd=1234)
        expected = []
        for doc in docs:
            shots = sampler.sample(k, eval_doc=doc)
            expected.append("".join(f"{s['context']} {s['choices'][s['answer']]}\n\n" for s in shots) + doc["context"])
        assert fewshot_contexts(items, k) == expected
    assert fewshot_contexts(items, 0) == [it.context for it in items]
    with pytest.raises(ValueError, match="needs more than 13 items"):
        fewshot_contexts(items, 13)


def test_word_count_is_the_harness_split():
    from lm_eval.api.task import ConfigurableTask

    for text in ["a b  c", "trailing newline\n", " leading", "", "tabs\tand\nlines \n\n"]:
        assert count_words(text) == ConfigurableTask.count_words(text)


def test_model_input_cuts_from_the_left_like_hflm():
    req = Request(tuple(range(10)), (10, 11, 12))
    tokens, n = model_input(req, 5)
    assert tokens == [7, 8, 9, 10, 11, 12] and n == 3  # (ctx + cont)[-(5 + 1):], the last 3 targets scored
    with pytest.raises(ValueError, match="longer than the context"):
        model_input(Request((0,), tuple(range(6))), 5)
