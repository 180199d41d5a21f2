"""Log-likelihood requests exactly as lm-evaluation-harness builds them (pure Python, no torch).

A request is a (context tokens, continuation tokens) pair; its score is the summed log-probability
of the continuation after the context. Each function here names the harness code it follows
(lm_eval 0.4.13: `lm_eval/utils.py`, `lm_eval/api/model.py`, `lm_eval/models/huggingface.py`,
`lm_eval/api/task.py`, `lm_eval/api/samplers.py`), because matching the harness number for number
depends on these details: the prefix token, where trailing whitespace goes, how a long input is cut.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

FEWSHOT_SEED = 1234  # lm_eval's simple_evaluate(fewshot_random_seed=1234)
TARGET_DELIMITER = " "  # the harness's default target_delimiter
FEWSHOT_DELIMITER = "\n\n"  # and its default fewshot_delimiter


@dataclass(frozen=True)
class Request:
    """Score `continuation` (non-empty) after `context` (non-empty)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def rolling_token_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> Iterator[Request]:
    """The disjoint windows of `loglikelihood_rolling`: `get_rolling_token_windows(token_list, prefix_token,
    max_seq_len, context_len=1)` followed by `make_disjoint_window`. Every token is predicted exactly
    once; the first window predicts the first token from `prefix_token`, each later window predicts up to
    `max_length` new tokens with the tokens just before them as context, up to `max_length` inputs in all."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    tokens = list(tokens)
    if not tokens:
        return
    first = min(max_length, len(tokens))
    yield _disjoint([prefix_token] + tokens[: first - 1], tokens[:first])
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)  # pred_len = max_seq_len - context_len + 1
        end = predicted + n
        yield _disjoint(tokens[max(0, end - max_length - 1): end - 1], tokens[end - n: end])
        predicted += n


def _disjoint(inputs: list[int], predicted: list[int]) -> Request:
    """`make_disjoint_window`: the context is the inputs that come before the first predicted token."""
    return Request(tuple(inputs[: len(inputs) - (len(predicted) - 1)]), tuple(predicted))


def model_input(req: Request, max_length: int) -> tuple[list[int], int]:
    """The tokens fed to the model for a request, and how many of the last positions are scored:
    `(context + continuation)[-(max_length + 1):][:-1]` as `HFLM._loglikelihood_tokens` cuts it (from
    the left when too long). The targets are the same tokens shifted by one."""
    if len(req.continuation) > max_length:
        raise ValueError(f"a continuation of {len(req.continuation)} tokens is longer than the context "
                         f"({max_length}); raise --max-length or shorten it")
    whole = (req.context + req.continuation)[-(max_length + 1):]
    return list(whole), len(req.continuation)


class HarnessEncoder:
    """Text to requests the way `HFLM` tokenizes: `tok_encode` with the tokenizer's default special
    tokens, and the prefix token (BOS, else EOS) for the first prediction.

    `tokenizer` is a `megaloom.data.Tokenizer`: `encode` never adds special tokens; a pretrained one
    (kind "pretrained") also has its `tokenizers` backend, whose post-processor adds what the model's
    Hugging Face tokenizer adds by default (BOS for Llama tokenizers, nothing for GPT-2's), which is
    what `tok_encode` gets; a text that already starts with the prefix token's string gets none
    (`has_bos_prefix`)."""

    def __init__(self, tokenizer: Any):
        self.encode_plain: Callable[[str], list[int]] = tokenizer.encode
        bos = getattr(tokenizer, "bos_id", None)
        self.prefix_token: int = bos if bos is not None else tokenizer.eos_id
        backend = getattr(tokenizer, "backend", None)
        self._with_specials = None
        if getattr(tokenizer, "kind", "") == "pretrained" and hasattr(backend, "post_processor"):
            self._with_specials = lambda text: backend.encode(text, add_special_tokens=True).ids
        self.prefix_text = tokenizer.decode([self.prefix_token])  # `has_bos_prefix` compares with this string

    def encode(self, text: str) -> list[int]:
        """`tok_encode(text)`: special tokens as the tokenizer adds them by default."""
        if self._with_specials is None or (self.prefix_text and text.startswith(self.prefix_text)):
            return self.encode_plain(text)
        return self._with_specials(text)

    def rolling(self, text: str, max_length: int) -> list[Request]:
        """`loglikelihood_rolling`'s windows of one document."""
        return list(rolling_token_windows(self.encode(text), self.prefix_token, max_length))

    def pair(self, context: str, continuation: str) -> Request:
        """`loglikelihood`'s request: trailing whitespace of the context moves to the continuation
        (`_encode_pair`), the pair is encoded whole and split where the context's encoding ends; an empty
        context is the prefix token (or the continuation's first token, when that is the prefix)."""
        if context == "":
            cont = self.encode_plain(continuation)
            if not cont:
                raise ValueError("an empty context with an empty continuation has nothing to score")
            if cont[0] != self.prefix_token:
                return Request((self.prefix_token,), tuple(cont))
            return Request(tuple(cont[:1]), tuple(cont[1:]))
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return Request(tuple(ctx), tuple(whole[len(ctx):]))


# ---------------------------------------------------------------- perplexity counts


def count_words(text: str) -> int:
    """`Task.count_words`: pieces between runs of whitespace, `len(re.split(r"\\s+", doc))` (a text
    that ends in a newline counts one empty piece more, as in the harness)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """`Task.count_bytes`: UTF-8 bytes."""
    return len(text.encode("utf-8"))


# ---------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class ChoiceItem:
    """One line of a choice file: `{"context": str, "choices": [str, ...], "answer": int}`."""

    context: str
    choices: tuple[str, ...]
    answer: int

    def solved(self) -> str:
        """As a few-shot example: `build_qa_turn` renders question, target delimiter, answer."""
        return self.context + TARGET_DELIMITER + self.choices[self.answer]


def fewshot_contexts(items: Sequence[ChoiceItem], k: int, seed: int = FEWSHOT_SEED) -> list[str]:
    """Each item's context with `k` solved examples from the same items before it, as the harness's
    default `ContextSampler` draws them when the few-shot split is the evaluated split: one
    `random.Random(seed)` for the whole file, per item (in file order) `sample(pool, k + 1)`, the item
    itself (and any equal item) removed, the first `k` kept; joined by the few-shot delimiter."""
    if k < 0:
        raise ValueError(f"--fewshot must not be negative, got {k}")
    if k == 0:
        return [it.context for it in items]
    if k >= len(items):
        raise ValueError(f"--fewshot {k} needs more than {k} items in the file (it has {len(items)})")
    rnd = random.Random(seed)
    out = []
    for it in items:
        shots = [x for x in rnd.sample(list(items), k + 1) if x != it][:k]
        if len(shots) < k:  # duplicates of the item were drawn: the harness resamples without them
            shots = rnd.sample([x for x in items if x != it], k)
        out.append("".join(s.solved() + FEWSHOT_DELIMITER for s in shots) + it.context)
    return out


def choice_requests(encoder: HarnessEncoder, contexts: Sequence[str], items: Sequence[ChoiceItem]) -> list[Request]:
    """One request per (item, choice): the continuation is the target delimiter and the choice."""
    return [encoder.pair(ctx, TARGET_DELIMITER + choice) for ctx, it in zip(contexts, items) for choice in it.choices]
