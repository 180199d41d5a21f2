"""Per-token log-probabilities and entropies of a language model's next-token distribution, chunked over tokens
and split over the vocabulary: what DPO, PPO and GRPO read from a policy (and its reference) instead of a loss.

log p(y) = z_y - logsumexp(z) and H = logsumexp(z) - Σ p_j z_j, where z are the logits (divided by a sampling
`temperature`). Under tensor parallelism each rank holds V/t columns of z (the head's rows [start, start + V/t)):
as in Megatron-LM's vocab-parallel cross entropy (reference/004, §2.3) the row maximum is all-reduced (MAX), then
the sum of exponentials, the target's logit and Σ e^z·z are all-reduced (SUM, one collective), so every rank gets
the full-vocabulary values without the logits being gathered. The rows are processed `chunk` at a time, like the
chunked loss of `megaloom/model/loss.py` and `megaloom/parallel/vocab_loss.py`: one chunk's fp32 logits exist at
a time, never the (N, V/t) of the batch.

Unlike a mean loss these outputs are vectors, so their gradient is not known in forward: forward keeps only
logsumexp and the entropy per token (2 floats a token), and backward forms each chunk's logits again, with

    d log p(y) / dz_k = 1[k = y] - p_k,        dH / dz_k = -p_k (log p_k + H),

scaled by the incoming per-token gradients (and by 1/temperature). The input is either the logits shard itself
(x (..., V/t), `weight=None`), or the head's input h (..., hidden) with its weight shard (V/t, hidden): then the
logits are formed per chunk from h @ Wᵀ (in the autocast dtype, as `F.linear` would) and never exist whole in any
dtype. With h the gradient returned for h is this rank's partial sum over its vocabulary rows: the column-parallel
`f` before the head (`megaloom.parallel.comm.enter_tp`) all-reduces it, as for the vocab-parallel loss. Targets
equal to -100 give 0 (and no gradient), as everywhere in megaloom.

Where t does not divide V each rank holds ceil(V/t) columns and the last rank's columns past V are padding
(`megaloom/parallel/shard.py`); given `vocab_size`, they are cut off before anything is computed, so they take no
part in the softmax and their gradient is zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from megaloom.parallel.comm import TPGroup, all_reduce_no_grad

IGNORE_INDEX = -100


def as_tp_group(group: dist.ProcessGroup | TPGroup | None) -> TPGroup:
    """The tensor-parallel group as the collectives here need it: None (the vocabulary is whole on this process),
    a torch.distributed group over which the vocabulary is split, or the model's own `TPGroup` (whose byte
    counter then counts these all-reduces too)."""
    if group is None:
        return TPGroup(None, 1, 0)
    if isinstance(group, TPGroup):
        return group
    return TPGroup(group, dist.get_world_size(group), dist.get_rank(group))


class _Source:
    """Where a chunk's logits come from: the logits shard itself, or h @ Wᵀ in the head's compute dtype."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor | None, temperature: float, dtype: torch.dtype,
                 columns: int):
        self.x, self.weight, self.temperature, self.dtype = x, weight, temperature, dtype
        self.columns = columns  # the real ones: padding columns (past V, on the last rank) are never read
        # fp32 statistics (fp64 inputs stay fp64, which the parity tests use)
        self.acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.w = weight[:columns].to(self.dtype) if weight is not None else None

    def logits(self, rows: slice) -> torch.Tensor:
        """This chunk's logits in the statistics dtype, a fresh tensor (the callers work on it in place)."""
        if self.w is None:
            z = self.x[rows, :self.columns].to(self.acc, copy=True)
        else:
            z = (self.x[rows].to(self.dtype) @ self.w.t()).to(self.acc)
        return z.div_(self.temperature) if self.temperature != 1.0 else z


def _forward(src: _Source, targets: torch.Tensor, tp: TPGroup, start: int, chunk: int):  # noqa: ANN202
    """logp (N,) and entropy (N,) of every row (0 where the target is ignored), and logsumexp (N,)."""
    n, cols = targets.shape[0], src.columns
    logp = torch.zeros(n, dtype=src.acc, device=targets.device)
    entropy, lse = torch.zeros_like(logp), torch.zeros_like(logp)
    for begin in range(0, n, chunk):
        sl = slice(begin, begin + chunk)
        valid = targets[sl] != IGNORE_INDEX
        local = targets[sl] - start
        inside = (local >= 0) & (local < cols) & valid
        z = src.logits(sl)
        zmax = z.max(dim=-1).values
        all_reduce_no_grad(zmax, tp, dist.ReduceOp.MAX)
        z.sub_(zmax.unsqueeze(-1))
        target = z.gather(-1, local.clamp(0, cols - 1).unsqueeze(-1)).squeeze(-1) * inside
        e = z.exp()
        stats = torch.stack([e.sum(dim=-1), target, (e * z).sum(dim=-1)])
        del e, z
        all_reduce_no_grad(stats, tp)  # one all-reduce: Σ e^z, the target's logit, Σ e^z·z (z shifted by the max)
        log_sum = stats[0].log()
        logp[sl] = (stats[1] - log_sum) * valid
        entropy[sl] = (log_sum - stats[2] / stats[0]) * valid
        lse[sl] = zmax + log_sum
    return logp, entropy, lse


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, tp, start, chunk, temperature, dtype, columns):  # noqa: ANN001, ANN205
        logp, entropy, lse = _forward(_Source(x, weight, temperature, dtype, columns), targets, tp, start, chunk)
        ctx.save_for_backward(x, weight, targets, entropy, lse)
        ctx.start, ctx.chunk, ctx.temperature, ctx.dtype, ctx.columns = start, chunk, temperature, dtype, columns
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):  # noqa: ANN001, ANN205
        x, weight, targets, entropy, lse = ctx.saved_tensors
        src = _Source(x, weight, ctx.temperature, ctx.dtype, ctx.columns)
        need_x, need_w = ctx.needs_input_grad[:2]
        cols = src.columns
        padded = weight is None and cols < x.shape[-1]  # the padding columns' gradient is zero
        grad_x = (torch.zeros_like(x) if padded else torch.empty_like(x)) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=src.acc) if need_w else None
        grad_w_real = grad_w[:cols] if need_w else None
        for begin in range(0, targets.shape[0], ctx.chunk):
            sl = slice(begin, begin + ctx.chunk)
            valid = targets[sl] != IGNORE_INDEX
            local = targets[sl] - ctx.start
            inside = (local >= 0) & (local < cols) & valid
            g_logp = grad_logp[sl].to(src.acc) * valid
            g_ent = grad_entropy[sl].to(src.acc) * valid
            z = src.logits(sl).sub_(lse[sl].unsqueeze(-1))  # log p over this rank's columns
            p = z.exp()
            # d(g·logp + g'·H)/dz = g·(1[y] - p) - g'·p·(log p + H), then through z = logits / temperature
            z.add_(entropy[sl].unsqueeze(-1)).mul_(p).mul_(g_ent.unsqueeze(-1))
            dz = p.mul_(g_logp.unsqueeze(-1)).add_(z).neg_()
            del z
            dz.scatter_add_(-1, local.clamp(0, cols - 1).unsqueeze(-1), (g_logp * inside).unsqueeze(-1))
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)
            if weight is None:
                grad_x[sl, :cols] = dz.to(x.dtype)
                continue
            dz = dz.to(src.dtype)
            if need_x:
                grad_x[sl] = (dz @ src.w).to(x.dtype)
            if need_w:
                grad_w_real += (dz.t() @ x[sl].to(src.dtype)).to(src.acc)
        return grad_x, grad_w.to(weight.dtype) if need_w else None, None, None, None, None, None, None, None


def token_logprobs_and_entropy(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None, *,
                               group: dist.ProcessGroup | TPGroup | None = None, vocab_start: int | None = None,
                               chunk: int = 1024, temperature: float = 1.0,
                               vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy of p, per token, both shaped like `targets` (fp32; 0 where the target is -100).

    x: the logits (..., V/t) of this rank's vocabulary columns, or, with `weight` (V/t, hidden), the head's input
    h (..., hidden). targets (...): token ids of the full vocabulary, aligned with x (the token that position
    predicts). group: the tensor-parallel group the vocabulary is split over (None: not split); this rank's columns
    start at `vocab_start` (default rank·V/t). vocab_size: the full vocabulary V, when this rank's columns at or past
    V are padding (t not dividing V; None: every column is real). Differentiable with respect to x and weight; see
    the module text."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    tp = as_tp_group(group)
    cols = x.shape[-1] if weight is None else weight.shape[0]
    start = tp.rank * cols if vocab_start is None else vocab_start
    if vocab_size is not None:
        cols = min(cols, vocab_size - start)
        if cols < 1:
            raise ValueError(f"this rank's columns start at {start}, past vocab_size ({vocab_size})")
    x2, y = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if x2.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x2.shape[0]} positions ({tuple(x.shape)}) but targets {y.shape[0]} "
                         f"({tuple(targets.shape)})")
    dev = x.device.type
    # under autocast the head's GEMMs run in the autocast dtype, as F.linear's would; logits are read as they are
    dtype = torch.get_autocast_dtype(dev) if weight is not None and torch.is_autocast_enabled(dev) else x.dtype
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    with torch.autocast(dev, enabled=False):  # dtypes are handled explicitly inside
        if needs_grad:
            logp, entropy = _TokenStats.apply(x2, weight, y, tp, start, chunk, temperature, dtype, cols)
        else:
            logp, entropy, _ = _forward(_Source(x2, weight, temperature, dtype, cols), y, tp, start, chunk)
    return logp.view(targets.shape), entropy.view(targets.shape)


def token_logprobs(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None, *,
                   group: dist.ProcessGroup | TPGroup | None = None, vocab_start: int | None = None,
                   chunk: int = 1024, temperature: float = 1.0, vocab_size: int | None = None) -> torch.Tensor:
    """log p(target) per token, shaped like `targets`, 0 where the target is -100 (TRL's `selective_log_softmax`,
    torchtune's `logits_to_logprobs`). Arguments as `token_logprobs_and_entropy`."""
    return token_logprobs_and_entropy(x, targets, weight, group=group, vocab_start=vocab_start, chunk=chunk,
                                      temperature=temperature, vocab_size=vocab_size)[0]


def token_entropy(x: torch.Tensor, weight: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                  group: dist.ProcessGroup | TPGroup | None = None, chunk: int = 1024,
                  temperature: float = 1.0, vocab_size: int | None = None) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution per position, shaped like x without its last dim, 0 where
    `mask` is False (TRL's `entropy_from_logits`). Differentiable (PPO's entropy bonus); other arguments as
    `token_logprobs_and_entropy`."""
    lead = x.shape[:-1]
    targets = torch.zeros(lead, dtype=torch.long, device=x.device)
    if mask is not None:
        targets = targets.masked_fill(~mask.bool(), IGNORE_INDEX)
    return token_logprobs_and_entropy(x, targets, weight, group=group, chunk=chunk, temperature=temperature,
                                      vocab_size=vocab_size)[1]


class SequenceLogprobs(NamedTuple):
    """Per-sequence log-probabilities: `sum` over the sequence's scored tokens (DPO), their `mean` (IPO's and
    SimPO's length normalisation), and the number of scored `tokens`."""

    sum: torch.Tensor
    mean: torch.Tensor
    tokens: torch.Tensor


def sequence_logprobs(token_logps: torch.Tensor, targets: torch.Tensor) -> SequenceLogprobs:
    """Sum and mean of per-token log-probabilities (..., T) over the last dim, leaving out targets equal to -100
    (a sequence with none has sum and mean 0). torchtune's `get_batch_log_probs`, TRL's `get_batch_logps`."""
    valid = targets != IGNORE_INDEX
    total = (token_logps * valid).sum(dim=-1)
    tokens = valid.sum(dim=-1)
    return SequenceLogprobs(total, total / tokens.clamp(min=1), tokens)
