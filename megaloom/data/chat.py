"""Chat templates: a conversation rendered as the model's own Jinja template renders it, tokenized, and
the mask of the tokens the assistant writes.

Rendering follows transformers' `apply_chat_template`: the same sandboxed Jinja environment (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text),
the special tokens passed as variables (`eos_token`, `bos_token`), and the text tokenized with the
special tokens it spells out ("<|im_end|>") read as their ids.

The assistant mask is found for any template, without `{% generation %}` markers (most templates have
none; those that do render here with the markers ignored). Turn i of the assistant writes exactly what
separates two renderings: the conversation before it with the generation prompt (what a model is given
when it is asked to answer) and the conversation up to and including it. So its tokens are those of
render(messages[:i+1]) after render(messages[:i], add_generation_prompt=True): the reply and whatever the
template closes the turn with (the end-of-turn token among it), which is what the model must learn to
produce and to stop with. That holds when each rendering is a prefix of the next and the pieces
tokenize as the whole does (no token across a boundary); both are checked, and a template or a record
that breaks either stops with one line that says which and why.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from megaloom.data.sources import DataError

# For megaloom's own tokenizers, which come without a template: Zephyr's layout, each turn closed by
# the eos token, so generation stops where a reply ends.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
DEFAULT_NAME = "megaloom's default chat template"

Message = dict[str, str]


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and where it came from (the name that error messages give)."""

    text: str
    name: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               variables: dict[str, str] | None = None) -> str:
        try:
            return _compile(self.text).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                              tools=None, documents=None, **(variables or {}))
        except Exception as e:  # jinja's errors, and raise_exception() of the template itself
            raise DataError(f"{self.name} failed to render a conversation: {type(e).__name__}: {e}") from None


def load_template(path: str, tokenizer: Any) -> ChatTemplate:
    """`data.chat_template` (a file) if set, else the tokenizer's own (`tokenizer.chat_template`, which
    pretrained tokenizers carry), else megaloom's default."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"data.chat_template = '{path}' is not a file; give a Jinja chat template file, "
                            "or leave it empty for the tokenizer's own")
        return ChatTemplate(p.read_text(encoding="utf-8"), f"the chat template {path}")
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return ChatTemplate(own, "the tokenizer's chat template")
    return ChatTemplate(DEFAULT_TEMPLATE, DEFAULT_NAME)


def template_variables(tokenizer: Any) -> dict[str, str]:
    """The special tokens a template may spell out, as transformers passes them."""
    out = {"eos_token": tokenizer.decode([tokenizer.eos_id])}
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None:
        out["bos_token"] = tokenizer.decode([bos])
    return out


def tokenize_conversation(tokenizer: Any, template: ChatTemplate, messages: Sequence[Message], *,
                          train_on_prompt: bool = False, where: str = "a conversation") -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether the loss counts it: the tokens of
    every assistant turn (train_on_prompt: every token). `where` names the record in errors."""
    variables = template_variables(tokenizer)
    full = template.render(messages, False, variables)
    if train_on_prompt:
        ids = tokenizer.encode_special(full)
        return ids, [True] * len(ids)
    spans = assistant_spans(template, messages, variables, full, where)
    cuts = sorted({0, len(full), *(c for span in spans for c in span)})
    ids: list[int] = []
    mask: list[bool] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer.encode_special(full[a:b])
        inside = any(s <= a and b <= e for s, e in spans)
        ids += piece
        mask += [inside] * len(piece)
    if ids != tokenizer.encode_special(full):
        raise DataError(f"{where}: {template.name} puts an assistant turn's boundary inside a token (its pieces "
                        "tokenize differently from the whole), so its tokens cannot be told apart; use a template "
                        "whose turns start and end with special tokens, or set data.train_on_prompt=true")
    if not any(mask):
        raise DataError(f"{where}: {template.name} gives no assistant tokens to train on (its assistant turns "
                        "render to nothing); use a template that renders assistant messages, or set "
                        "data.train_on_prompt=true")
    return ids, mask


def assistant_spans(template: ChatTemplate, messages: Sequence[Message], variables: dict[str, str], full: str,
                    where: str) -> list[tuple[int, int]]:
    """Character spans of `full` (the whole conversation rendered) that the assistant turns add."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to train on; "
                        "give every record at least one {\"role\": \"assistant\", ...} message")
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], True, variables)
        upto = template.render(messages[:i + 1], False, variables)
        if not upto.startswith(before) or not full.startswith(upto):
            raise DataError(f"{where}: {template.name} does not render this conversation turn by turn (message {i} "
                            "changes how what precedes it renders, or the generation prompt is not how an "
                            "assistant turn begins), so the assistant's tokens cannot be found; use another "
                            "template or set data.train_on_prompt=true")
        if spans and len(before) < spans[-1][1]:
            raise DataError(f"{where}: {template.name} renders assistant message {i} overlapping the one before; "
                            "use another template or set data.train_on_prompt=true")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return spans


@functools.lru_cache(maxsize=16)
def _compile(text: str) -> Any:
    """The template compiled in the environment transformers uses (chat_template_utils)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body: the markers are not needed here."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template: not valid Jinja (line {e.lineno}: {e.message})") from None
