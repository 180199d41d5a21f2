"""Sampling from MODEL in any (t, p) layout, and the chat prompt: `megaloom generate`.

The model is the one `eval.load` builds (a run, a checkpoint, a Hugging Face directory or a .gguf file),
so generation and evaluation load the same way. Each step is one forward with a KV cache per model
chunk (each rank caches its own layers and heads): without pipelining the model is called directly,
with it the `PipelineRunner` carries the step through the stages (`forward_outputs`). The last stage
gathers the vocabulary-parallel logits over its tp group (`gather_vocab`, which drops the padding of a
vocabulary that t does not divide), samples (`megaloom.model.sample_next`), and one broadcast over
the model-parallel group gives every rank of the replica the token, so the first stage can feed it next.
Every data-parallel replica generates the same samples (rank 0 prints).

`--chat` renders the conversation with the model's own chat template the way transformers'
`apply_chat_template(messages, add_generation_prompt=True)` does (`megaloom.data.chat`), and the
special tokens the template writes are read as their ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaloom.data import Tokenizer
from megaloom.data.chat import ChatTemplate, template_variables
from megaloom.errors import ConfigError
from megaloom.model import sample_next
from megaloom.parallel.grid import Coords, ProcessGrid, rank_of
from megaloom.parallel.tensor import gather_vocab
from megaloom.precision import autocast
from megaloom.train.assemble import ParallelModel


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    use_cache: bool = True

    def check(self) -> None:
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0 or self.temperature < 0 or self.max_new_tokens < 0:
            raise ConfigError(f"--top-p ({self.top_p}) must be in (0, 1], --top-k ({self.top_k}), --temperature "
                              f"({self.temperature}) and --max-new-tokens ({self.max_new_tokens}) must not be negative")


def chat_messages(message: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]


def chat_prompt(tokenizer: Tokenizer, message: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn conversation ready for the assistant's reply: the model's own chat
    template with add_generation_prompt=True, tokenized with its special tokens parsed."""
    if not tokenizer.chat_template:
        raise ConfigError("--chat: this model's tokenizer has no chat template (a base model, or a run trained "
                          "without one); use --prompt, or a chat model such as an SFT run")
    template = ChatTemplate(tokenizer.chat_template, "the model's chat template")
    text = template.render(chat_messages(message, system), add_generation_prompt=True,
                           variables=template_variables(tokenizer))
    return tokenizer.encode_special(text)


@torch.no_grad()
def generate_parallel(pm: ParallelModel, grid: ProcessGrid, prompt: list[int], num_samples: int, s: Sampling,
                      device: torch.device, eos_id: int | None = None, precision: str = "fp32") -> list[list[int]]:
    """Prompt plus up to `s.max_new_tokens` tokens per sample (stopping once every sample has produced
    `eos_id`), the same on every rank. Collective over the model-parallel group."""
    chunks = list(pm.model) if pm.runner is not None else [pm.model]
    limit = chunks[0].cfg.seq_len
    if len(prompt) >= limit:
        raise ConfigError(f"the prompt is {len(prompt)} tokens but the model's context (model.seq_len) is {limit}; "
                          "shorten it")
    for c in chunks:
        c.eval()
    seq = torch.tensor([prompt] * num_samples, device=device)
    steps = min(s.max_new_tokens, limit - len(prompt))
    # sized to this call (not model.seq_len): zeroing 8,192 positions of SmolLM2's 30 layers is 377 MB
    caches = [c.new_cache(num_samples, len(prompt) + steps) for c in chunks] if s.use_cache else None
    gen = torch.Generator(device=device).manual_seed(s.seed)
    last = grid.pp_rank == grid.pp - 1
    step = seq
    for _ in range(steps):
        logits = _last_logits(pm, chunks, step if s.use_cache else seq, caches, precision)
        if last:
            nxt = sample_next(logits, s.temperature, s.top_k, s.top_p, gen)
        else:
            nxt = torch.empty(num_samples, dtype=torch.long, device=device)
        if grid.tp * grid.pp > 1:  # the last stage's first tp rank speaks for the replica
            src = rank_of(Coords(tp=0, dp=grid.dp_rank, pp=grid.pp - 1), grid.tp, grid.pp, grid.dp)
            dist.broadcast(nxt, src=src, group=grid.mp_group)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        step = nxt[:, None]
        if eos_id is not None and bool((seq[:, len(prompt):] == eos_id).any(dim=1).all()):
            break
    return seq.tolist()


def _last_logits(pm: ParallelModel, chunks: list, inputs: torch.Tensor, caches: list | None,
                 precision: str) -> torch.Tensor | None:
    """Full-vocabulary logits of the last position (B, V) on the last stage; None elsewhere."""
    if pm.runner is None:
        with autocast(precision, inputs.device):
            local = pm.model(inputs, cache=caches[0] if caches else None)
    else:
        kwargs = [{"cache": c} for c in caches] if caches else None
        local = pm.runner.forward_outputs([(inputs, None)], precision, kwargs)[0]
        if local is None:
            return None
    # each tp rank holds ceil(V/t) columns of the vocabulary; the padding past V is dropped, never sampled
    return gather_vocab(local[:, -1].float(), pm.tp, chunks[-1].cfg.vocab_size)


def decode_samples(tokenizer: Tokenizer, rows: list[list[int]], prompt_len: int, eos_id: int | None,
                   reply_only: bool) -> list[str]:
    """Text of each sample, cut at its first eos after the prompt; the reply alone for a chat."""
    out = []
    for row in rows:
        new = row[prompt_len:]
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id)]
        out.append(tokenizer.decode(new if reply_only else row[:prompt_len] + new))
    return out
