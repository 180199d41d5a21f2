"""Tensor-parallel layers (Megatron-LM paper §2.3, reference/004) and `parallelize_tensor`.

- ColumnParallelLinear: Y = X·A with A split by columns (our weight rows): each rank computes its
  slice of the output; the input goes through `f` (or the sequence all-gather).
- RowParallelLinear: Y = X·B with B split by rows: each rank holds a slice of the input features and
  produces a partial sum; `g` (or the sequence reduce-scatter) adds them.
- VocabParallelEmbedding: each rank holds ceil(V/t) rows (`layout.vocab_rows`); tokens outside its
  range contribute zeros and the partial embeddings are summed. Where t does not divide V the last
  rank's trailing rows are padding (`ShardSpec`): zero, never looked up, left out of every softmax.
- the head's loss (`vocab_loss.py`): logits split over the vocabulary, never gathered and formed a
  chunk of rows at a time; per chunk one all-reduce of the max and one of the sum of exponentials and
  the target logit; -100 targets ignored as on one device.

A self-attention layer splits its heads (and grouped k/v heads) over the ranks: QKV is column-
parallel, the output projection row-parallel; the MLP's first GEMM is column-parallel and the second
row-parallel. So a layer needs two `g` forward and two `f` backward (Figure 5 of the paper).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaloom.parallel.comm import TPGroup, all_reduce_no_grad, enter_tp, leave_tp, local
from megaloom.parallel.shard import ShardSpec
from megaloom.parallel.vocab_loss import vocab_parallel_linear_cross_entropy


class ColumnParallelLinear(nn.Module):
    """Output features split over tp ranks; a fused weight is split block by block ([q; k; v])."""

    def __init__(self, full: nn.Linear, tp: TPGroup, blocks: tuple[int, ...] | None = None):
        super().__init__()
        self.tp = tp
        out_f, in_f = full.weight.shape
        blocks = blocks or (out_f,)
        spec = ShardSpec((out_f, in_f), dim=0, blocks=blocks, rank=tp.rank, size=tp.size)
        self.weight = nn.Parameter(torch.empty(spec.local_shape, dtype=full.weight.dtype))
        self.weight.shard_spec = spec
        self.bias = None
        if full.bias is not None:
            bias_spec = ShardSpec((out_f,), dim=0, blocks=blocks, rank=tp.rank, size=tp.size)
            self.bias = nn.Parameter(torch.empty(bias_spec.local_shape, dtype=full.bias.dtype))
            self.bias.shard_spec = bias_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(enter_tp(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split over tp ranks; the bias (replicated) is added once, after the reduction."""

    def __init__(self, full: nn.Linear, tp: TPGroup):
        super().__init__()
        self.tp = tp
        out_f, in_f = full.weight.shape
        spec = ShardSpec((out_f, in_f), dim=1, blocks=(in_f,), rank=tp.rank, size=tp.size)
        self.weight = nn.Parameter(torch.empty(spec.local_shape, dtype=full.weight.dtype))
        self.weight.shard_spec = spec
        self.bias = None if full.bias is None else nn.Parameter(torch.empty(out_f, dtype=full.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = leave_tp(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [rank·R, (rank+1)·R) of the token embedding, R = ceil(V/t) (the last rank's rows past V are
    padding, which no token id reaches); returns this rank's *partial* sum."""

    def __init__(self, full: nn.Embedding, tp: TPGroup):
        super().__init__()
        vocab, hidden = full.weight.shape
        spec = ShardSpec((vocab, hidden), dim=0, blocks=(vocab,), rank=tp.rank, size=tp.size)
        self.tp, self.per_rank, self.real = tp, spec.extent(vocab), spec.real(vocab)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(spec.local_shape, dtype=full.weight.dtype))
        self.weight.shard_spec = spec

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return out.masked_fill(outside.unsqueeze(-1), 0.0)


class ParallelEmbedding(nn.Module):
    """The model's `embed` under tensor parallelism: vocab-parallel tokens, summed over ranks by `g`
    (a reduce-scatter along the sequence with sequence parallelism), plus replicated positions."""

    def __init__(self, embed: nn.Module, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.tok = VocabParallelEmbedding(embed.tok, tp)
        self.pos = embed.pos  # replicated (GPT-2 only)
        self.drop = embed.drop

    def forward(self, tokens: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None,
                prompt: torch.Tensor | None = None) -> torch.Tensor:
        """`positions` (B, T) of the whole sequence: each token's own position (packed documents).
        `prompt` (P, hidden), replicated: soft-prompt embeddings put before the tokens' (prompt tuning);
        zero rows stand for them in the sum over ranks, then each rank adds the prompt rows of its slice."""
        partial = self.tok(tokens).float()  # the residual stream is fp32 (FSDP may gather bf16)
        if prompt is not None:
            partial = torch.cat([partial.new_zeros(partial.shape[0], prompt.shape[0], partial.shape[2]), partial], 1)
        x = leave_tp(partial, self.tp)
        T = x.shape[1]
        first = self.tp.rank * T if self.tp.sequence_parallel else 0  # this rank's slice of the sequence
        if prompt is not None:  # on every rank, rows or not: the backward's collectives need every rank
            rows = prompt[first:first + T].float()
            x = x + torch.cat([rows, rows.new_zeros(T - rows.shape[0], rows.shape[1])]).unsqueeze(0)
        if self.pos is not None:
            if positions is not None:
                x = x + self.pos(positions[:, first:first + T])
            else:
                x = x + self.pos(torch.arange(start + first, start + first + T, device=tokens.device))
        return self.drop(x)


class ParallelHead(nn.Module):
    """Logits split over the vocabulary and the vocab-parallel loss. Tied to the embedding shard (GPT-2)
    or its own column-parallel weight named `head.weight` (Llama). Each rank's weight has ceil(V/t)
    rows, of which the first `real` are the vocabulary: the loss never forms the padding's logits, and
    `forward` returns them (zero) only so that every rank's shard has one shape; `gather_vocab` drops
    them."""

    def __init__(self, head: nn.Module, embed: ParallelEmbedding | None, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.chunk_rows = head.chunk_rows
        self._tied = [embed.tok] if head.weight is None else []
        self.weight = None
        self._real = embed.tok.real if self._tied else 0
        if head.weight is not None:
            vocab = head.weight.shape[0]
            spec = ShardSpec(tuple(head.weight.shape), dim=0, blocks=(vocab,), rank=tp.rank, size=tp.size)
            self.weight = nn.Parameter(torch.empty(spec.local_shape, dtype=head.weight.dtype))
            self.weight.shard_spec = spec
            self._real = spec.real(vocab)

    @property
    def start(self) -> int:
        """First vocabulary row this rank holds."""
        rows = self._tied[0].per_rank if self._tied else self.weight.shape[0]
        return self.tp.rank * rows

    @property
    def real(self) -> int:
        """Rows of this rank's weight that are vocabulary entries; the rest (on the last rank) is padding."""
        return self._real

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._tied[0].weight if self._tied else self.weight
        return F.linear(enter_tp(x, self.tp), w)

    def hidden_loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The loss from the final hidden states (the model's entry point): the logits stay split over
        the vocabulary and are formed `chunk_rows` tokens at a time; -100 targets are ignored.
        `reduction="none"`: per token, no gradient."""
        w = self._tied[0].weight if self._tied else self.weight
        return vocab_parallel_linear_cross_entropy(enter_tp(h, self.tp), w, targets, self.tp, self.start,
                                                   self.chunk_rows, reduction, self.real)


def parallelize_tensor(model: nn.Module, tp: TPGroup) -> nn.Module:
    """Swap the model's layers for their tensor-parallel versions, in place (DESIGN principle 4).

    Parameters are left uninitialised: call `init_model(model, seed)` afterwards, which fills each
    shard with its slice of the single-device model's tensor.
    """
    if tp.size == 1:
        return model
    cfg = model.cfg
    for block in model.layers.values():
        attn = block.attn
        q, kv = cfg.heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        attn.qkv = ColumnParallelLinear(attn.qkv, tp, blocks=(q, kv, kv))
        attn.proj = RowParallelLinear(attn.proj, tp)
        attn.heads, attn.kv_heads = cfg.heads // tp.size, cfg.n_kv_heads // tp.size
        mlp = block.mlp
        mlp.up = ColumnParallelLinear(mlp.up, tp, blocks=(cfg.ffn, cfg.ffn) if mlp.swiglu else None)
        mlp.down = RowParallelLinear(mlp.down, tp)
        block.drop.set_sequence_shard(tp)
    if model.embed is not None:
        model.embed = ParallelEmbedding(model.embed, tp)
        model.embed.drop.set_sequence_shard(tp)
    if model.head is not None:
        model.head = ParallelHead(model.head, model.embed, tp)
    model.tp = tp
    return model


def sync_replicated_grads(model: nn.Module, tp: TPGroup) -> None:
    """With sequence parallelism each rank sees only its part of the sequence, so the gradients of the
    parameters every rank holds whole (norms, row-parallel biases, positions) are partial: sum them."""
    if tp.size == 1 or not tp.sequence_parallel:
        return
    # under ZeRO-2/3 each dp rank sums its own part of the gradients
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None and getattr(p, "shard_spec", None) is None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_no_grad(flat, tp)
        for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(new)


def gather_full(param: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    """The full tensor of a (possibly sharded) parameter: the dp split of ZeRO-2/3 undone, then the tp
    shards reassembled block by block. A collective when either applies."""
    spec = getattr(param, "shard_spec", None)
    if hasattr(param, "full_tensor"):
        param = param.full_tensor()
    if spec is None or tp is None or tp.size == 1:
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(tp.size)]
    dist.all_gather(parts, param.detach().contiguous(), group=tp.group)
    return spec.assemble(parts)


def gather_vocab(logits: torch.Tensor, tp: TPGroup | None, vocab: int) -> torch.Tensor:
    """Full-vocabulary logits (..., V) from each tp rank's shard (..., ceil(V/t)): all-gathered over the
    tp group, the padding columns of the last shard(s) dropped. A collective when t > 1."""
    if tp is None or tp.size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp.size)]
    dist.all_gather(parts, logits.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)[..., :vocab]
