"""The decoder-only transformer of both families (GPT-2 style and Llama style).

Layers live in a ModuleDict keyed by their global index, so a slice of the model (a pipeline stage)
keeps the same parameter names as the full model and checkpoints stay layout independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from megaloom.config import ModelConfig
from megaloom.model.dropout import LayoutDropout
from megaloom.model.layers import Block, KVCache, Packing, make_norm, rotary_tables
from megaloom.model.loss import IGNORE_INDEX, linear_cross_entropy


class Embedding(nn.Module):
    """Token embedding, plus learned positions for GPT-2 style models."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.positions, cfg.hidden) if cfg.family == "gpt2" else None
        self.drop = LayoutDropout(cfg.dropout, "embed.drop")

    def forward(self, tokens: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None,
                prompt: torch.Tensor | None = None) -> torch.Tensor:
        """`positions` (B, T): each token's own position (packed documents); else start, start + 1, ...
        `prompt` (P, hidden): soft-prompt embeddings put before the tokens' (prompt tuning), positions
        included: the output is (B, P + T, hidden)."""
        x = self.tok(tokens).float()  # the residual stream is fp32, also where FSDP gathers the table in bf16
        if prompt is not None:
            x = torch.cat([prompt.float().expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos is not None:
            if positions is None:
                positions = torch.arange(start, start + x.shape[1], device=tokens.device)
            x = x + self.pos(positions)
        return self.drop(x)


class LMHead(nn.Module):
    """Logits and loss. A tied head (GPT-2, and Llama-family models such as SmolLM2 with model.head =
    "tied") uses the token embedding as its projection (no parameter of its own); otherwise it has its
    own `head.weight`."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding | None):
        super().__init__()
        self._tied = [embedding] if cfg.tied else []  # a list: not registered twice as a submodule
        self.weight = None if cfg.tied else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden))
        self.chunk_rows = 2048  # tokens per chunk of the loss: 2048·V fp32 logits at a time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._tied[0].weight if self._tied else self.weight)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy, in fp32."""
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def hidden_loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The same loss from the final hidden states, `chunk_rows` tokens at a time: the full fp32
        logits are never in memory (megaloom/model/loss.py). `reduction="none"`: per token, no gradient."""
        return linear_cross_entropy(h, self._tied[0].weight if self._tied else self.weight, targets, self.chunk_rows,
                                    reduction)


class Transformer(nn.Module):
    """The whole model, or one pipeline stage of it: `layer_ids` are the (global) layers it holds,
    `first` adds the embedding, `last` the final norm, the head and the loss.

    A GPT-2 last stage that is not also the first holds its own copy of the tied token embedding
    (`embed.tok.weight`, same name and initial value); the pipeline runtime keeps the two copies equal
    by summing their gradients (Megatron-LM's embedding group)."""

    def __init__(self, cfg: ModelConfig, layer_ids: Sequence[int] | None = None, first: bool = True,
                 last: bool = True):
        super().__init__()
        self.cfg, self.first, self.last = cfg, first, last
        layer_ids = range(cfg.layers) if layer_ids is None else layer_ids
        self.embed = Embedding(cfg) if first or (last and cfg.tied) else None
        if self.embed is not None and not first:
            self.embed.pos = None  # the last stage only needs the tied token embedding
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in layer_ids})
        self.norm = make_norm(cfg) if last else None
        self.head = LMHead(cfg, self.embed.tok if cfg.tied else None) if last else None
        self.tp = None  # a TPGroup once parallelize_tensor has run
        # virtual tokens before every sequence (megaloom/tune/prompt.py), set on every stage: prompt tuning's
        # soft prompt (`prompt`, held by the first stage) makes the sequence inside the model longer; prefix
        # tuning's keys and values are held by each layer's attention. Real tokens' positions start after them.
        self.prompt: nn.Parameter | None = None
        self.prompt_tokens = 0
        self.prefix_tokens = 0
        if cfg.family == "llama":
            cos, sin = rotary_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def set_virtual_tokens(self, prompt: int = 0, prefix: int = 0) -> None:
        """Make room for `prompt` soft-prompt or `prefix` prefix positions before every sequence: the
        rotary tables grow by that much (GPT-2's learned positions must have the rows: the config check)."""
        self.prompt_tokens, self.prefix_tokens = prompt, prefix
        if self.cfg.family == "llama":
            cos, sin = rotary_tables(replace(self.cfg, seq_len=self.cfg.seq_len + prompt + prefix), self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin

    def prepended(self, cache: KVCache | None = None) -> int:
        """Tokens this forward puts before the inputs inside the model: the soft prompt, unless a KV
        cache already holds it. Every stage knows it, so the pipeline's activations can be sized."""
        return self.prompt_tokens if cache is None or cache.length == 0 else 0

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.rope_cos, self.rope_sin) if self.cfg.family == "llama" else None

    def hidden_states(self, inputs: torch.Tensor, cache: KVCache | None = None,
                      docs: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (first stage) or the previous stage's hidden states -> this stage's output. `docs`
        (B, T) document ids of packed sequences (every stage gets them; under sequence parallelism the
        whole sequence's): positions restart and attention stays inside each document."""
        x = inputs
        packing = None
        prepend = self.prepended(cache)
        if docs is not None:
            if cache is not None:
                raise ValueError("packed documents (docs) and a KV cache do not go together; generate unpacked")
            packing = Packing.from_docs(docs, prepend, self.prefix_tokens)
        if self.first:
            start = cache.length if cache is not None else self.prefix_tokens
            virtual = self.prompt_tokens + self.prefix_tokens
            if start + prepend + inputs.shape[1] > self.cfg.seq_len + virtual:
                raise ValueError(f"sequence of {start + prepend + inputs.shape[1] - virtual} tokens exceeds "
                                 f"model.seq_len ({self.cfg.seq_len})")
            prompt = self.prompt if prepend else None
            x = (self.embed(inputs, start, prompt=prompt) if packing is None
                 else self.embed(inputs, positions=packing.positions, prompt=prompt))
        rope = self.rope
        for block in self.layers.values():
            x = block(x, rope, cache, packing)
        if cache is not None:
            cache.length += prepend + inputs.shape[1]
        return self.norm(x) if self.last else x

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, reduction: str = "mean", docs: torch.Tensor | None = None,
                head_fn: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, T, V) without targets; the mean next-token cross entropy (fp32) with them, or with
        `reduction="none"` each token's (B, T), no gradient (evaluation: megaloom/eval). A stage that is
        not the last returns its hidden states. Everything goes through `forward`, so that wrappers
        that hook it (FSDP2 gathering parameters) see every call. `docs`: packed documents (hidden_states).
        `head_fn(head, h, prepended)`: what the last stage returns instead, from the head and the final
        hidden states (an objective that reads log-probabilities, e.g. DPO: megaloom/align/dpo.py);
        `prepended` leading positions of h are virtual tokens (prompt tuning) that predict nothing."""
        prepend = self.prepended(cache)
        h = self.hidden_states(inputs, cache, docs)
        if not self.last:
            return h
        if head_fn is not None:
            return head_fn(self.head, h, prepend)
        if targets is None:
            return self.head(h)[:, prepend:]  # the soft prompt's positions predict nothing
        if prepend:
            targets = F.pad(targets, (prepend, 0), value=IGNORE_INDEX)
        out = self.head.hidden_loss(h, targets, reduction)
        return out[:, prepend:] if reduction == "none" else out

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        kv_heads = self.cfg.n_kv_heads // (self.tp.size if self.tp is not None else 1)  # this rank's heads
        virtual = self.prompt_tokens + self.prefix_tokens
        cache = KVCache(self.cfg, batch, (max_len or self.cfg.seq_len) + virtual, p.device, dtype,
                        layer_ids=[int(i) for i in self.layers], kv_heads=kv_heads)
        if self.prefix_tokens:  # prefix tuning: the cache starts with every layer's prefix
            for i, block in self.layers.items():
                cache.k[int(i)][:, :, :self.prefix_tokens], cache.v[int(i)][:, :, :self.prefix_tokens] = \
                    block.attn.prefix_kv(batch, dtype)
            cache.length = self.prefix_tokens
        return cache
