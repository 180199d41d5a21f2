"""The two evaluation tasks, perplexity and multiple choice, with the metrics lm-evaluation-harness
reports for them.

- perplexity (the harness's `loglikelihood_rolling` tasks, e.g. wikitext): every token of each document
  predicted once in disjoint windows of up to `max_length` tokens. `nll` is the summed negative
  log-likelihood over all documents; token, word and byte perplexities are exp(nll / count) with the
  counts summed over documents (the harness's `weighted_perplexity`), `bits_per_byte` = nll / bytes / ln 2.
- choice (the harness's `multiple_choice` tasks): each choice scored as the log-likelihood of " " + choice
  after the context; `acc` picks the largest, `acc_norm` the largest per character of the choice;
  `acc_stderr` is the standard error of the mean accuracy (sample standard deviation / sqrt(n)).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megaloom.errors import ConfigError
from megaloom.eval.requests import (
    ChoiceItem,
    HarnessEncoder,
    Request,
    choice_requests,
    count_bytes,
    count_words,
    fewshot_contexts,
)
from megaloom.eval.score import Scorer
from megaloom.eval.spec import TaskSpec

Progress = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None] | None]]


# ---------------------------------------------------------------- data


def read_documents(paths: Sequence[str]) -> list[str]:
    """Perplexity documents: a text file is one document; a .jsonl file one per line (its "text")."""
    docs = []
    for path in paths:
        if path.endswith(".jsonl"):
            for n, obj in _jsonl(path):
                if not isinstance(obj.get("text"), str):
                    raise ConfigError(f"{path}:{n}: a perplexity .jsonl line needs a \"text\" string")
                docs.append(obj["text"])
        else:
            docs.append(Path(path).read_text(encoding="utf-8"))
    return docs


def read_choice_items(paths: Sequence[str]) -> list[ChoiceItem]:
    items = []
    for path in paths:
        for n, obj in _jsonl(path):
            ctx, choices, answer = obj.get("context"), obj.get("choices"), obj.get("answer")
            ok = (isinstance(ctx, str) and isinstance(choices, list) and choices
                  and all(isinstance(c, str) for c in choices) and isinstance(answer, int)
                  and 0 <= answer < len(choices))
            if not ok:
                raise ConfigError(f"{path}:{n}: expected {{\"context\": str, \"choices\": [str, ...], \"answer\": int "
                                  f"(0..len(choices)-1)}}, got {json.dumps(obj)[:200]}")
            items.append(ChoiceItem(ctx, tuple(choices), answer))
    return items


def _jsonl(path: str):  # noqa: ANN202
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e})") from None


# ---------------------------------------------------------------- tasks


@dataclass
class TaskResult:
    spec: TaskSpec
    metrics: dict[str, float]
    details: list[dict] = field(default_factory=list)  # per document or per item, for tests and --details


def run_task(spec: TaskSpec, scorer: Scorer, tokenizer: object, progress: Progress | None = None) -> TaskResult:
    """Run one task; the same result on every rank. `progress(label, total)` is a context that yields
    `advance(n)`, e.g. `Console.counter`."""
    encoder = HarnessEncoder(tokenizer)
    if spec.task == "perplexity":
        return perplexity(spec, scorer, encoder, read_documents(spec.data), progress)
    return choice(spec, scorer, encoder, read_choice_items(spec.data), progress)


def perplexity(spec: TaskSpec, scorer: Scorer, encoder: HarnessEncoder, docs: Sequence[str],
               progress: Progress | None = None) -> TaskResult:
    max_length = spec.max_length or scorer.context
    windows = [encoder.rolling(doc, max_length) for doc in docs]
    requests = [w for ws in windows for w in ws]
    lls = iter(_score(scorer, requests, max_length, spec, progress))
    details = []
    for doc, ws in zip(docs, windows):
        ll = sum(next(lls) for _ in ws)  # in window order, as loglikelihood_rolling sums them
        details.append({"ll": ll, "tokens": sum(len(w.continuation) for w in ws), "words": count_words(doc),
                        "bytes": count_bytes(doc)})
    tokens, words, nbytes = (sum(d[k] for d in details) for k in ("tokens", "words", "bytes"))
    nll = -sum(d["ll"] for d in details)
    metrics = {"documents": len(docs), "tokens": tokens, "words": words, "bytes": nbytes, "nll": nll,
               "token_perplexity": _exp(nll / max(tokens, 1)), "word_perplexity": _exp(nll / max(words, 1)),
               "byte_perplexity": _exp(nll / max(nbytes, 1)), "bits_per_byte": nll / max(nbytes, 1) / math.log(2),
               "max_length": max_length}
    return TaskResult(spec, metrics, details)


def choice(spec: TaskSpec, scorer: Scorer, encoder: HarnessEncoder, items: Sequence[ChoiceItem],
           progress: Progress | None = None) -> TaskResult:
    max_length = spec.max_length or scorer.context
    contexts = fewshot_contexts(items, spec.fewshot)
    requests = choice_requests(encoder, contexts, items)
    lls = iter(_score(scorer, requests, max_length, spec, progress))
    details = []
    for it in items:
        ll = [next(lls) for _ in it.choices]
        norm = [x / len(c) if c else -math.inf for x, c in zip(ll, it.choices)]  # the harness: ll / len(choice)
        pred, pred_norm = _argmax(ll), _argmax(norm)
        details.append({"lls": ll, "pred": pred, "pred_norm": pred_norm, "answer": it.answer,
                        "acc": float(pred == it.answer), "acc_norm": float(pred_norm == it.answer)})
    n = len(details)
    acc = [d["acc"] for d in details]
    acc_norm = [d["acc_norm"] for d in details]
    metrics = {"n": n, "acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n, "acc_stderr": _stderr(acc),
               "acc_norm_stderr": _stderr(acc_norm), "fewshot": spec.fewshot, "max_length": max_length}
    return TaskResult(spec, metrics, details)


def _score(scorer: Scorer, requests: Sequence[Request], max_length: int, spec: TaskSpec,
           progress: Progress | None) -> list[float]:
    with progress(spec.label, len(requests)) if progress else contextlib.nullcontext(None) as advance:
        return scorer.loglikelihoods(requests, max_length, spec.batch_size, advance)


def _argmax(values: Sequence[float]) -> int:
    """The first largest, as numpy's argmax."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _stderr(values: Sequence[float]) -> float:
    """`mean_stderr`: sample standard deviation (n - 1) over sqrt(n); NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
