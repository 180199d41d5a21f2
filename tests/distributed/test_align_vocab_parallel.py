"""Log-probabilities and entropies over a vocabulary split over 2 gloo processes equal the single-process values,
and so do their gradients: the logits path (each rank's gradient is its columns of the full one), and the head path
(h's gradient summed over the ranks, as the column-parallel `f` would, and each rank's rows of the weight's), with
the group passed as a plain torch.distributed group and as the model's TPGroup. With V = 41 each rank holds 21
columns and the last one padding (`vocab_size`): a padding logit of any value changes nothing and gets no gradient."""

import torch
import torch.distributed as dist

from megaloom.align import token_logprobs_and_entropy
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.shard import ShardSpec

from .launch import run_workers

B, T, H = 2, 9, 8


def _worker(rank, world):
    for V in (40, 41):
        _check(rank, world, V)


def _check(rank, world, V):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -100
    a, b = torch.randn(2, B, T, generator=g)  # upstream gradients of log p and H
    spec = ShardSpec((V, H), 0, (V,), rank, world)  # rank r: columns [21r, 21r + 21), past V padding (V = 41)
    mine = spec.take  # this rank's columns (dim 0 of a weight), zero padding
    assert (targets[targets >= 0] < V // world).any() and (targets >= V // world).any()  # targets on both ranks
    padded = {"vocab_size": V} if V % world else {}

    # one process, whole vocabulary
    full_h, full_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    want_lp, want_ent = token_logprobs_and_entropy(full_h, targets, full_w, chunk=4, temperature=0.9)
    ((a * want_lp).sum() + (b * want_ent).sum()).backward()
    full_logits = (h @ w.t()).requires_grad_()
    lp, ent = token_logprobs_and_entropy(full_logits, targets, chunk=4, temperature=0.9)
    ((a * lp).sum() + (b * ent).sum()).backward()

    for group in (dist.group.WORLD, TPGroup(dist.group.WORLD, world, rank)):
        # the head path: this rank's rows of the weight, the full h
        my_h, my_w = h.clone().requires_grad_(), mine(w).requires_grad_()
        lp, ent = token_logprobs_and_entropy(my_h, targets, my_w, group=group, chunk=4, temperature=0.9, **padded)
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-6)
        ((a * lp).sum() + (b * ent).sum()).backward()
        grad_h = my_h.grad.clone()
        dist.all_reduce(grad_h, group=dist.group.WORLD)  # what f's backward does with the partial sums
        torch.testing.assert_close(grad_h, full_h.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(my_w.grad, mine(full_w.grad), rtol=1e-5, atol=1e-6)

        # the logits path: this rank's columns of the logits, a padding column (if any) set large
        shard = mine(full_logits.detach().transpose(0, -1)).transpose(0, -1).contiguous()
        shard[..., spec.real(V):] = 50.0
        shard.requires_grad_()
        lp, ent = token_logprobs_and_entropy(shard, targets, group=group, chunk=4, temperature=0.9, **padded)
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-6)
        ((a * lp).sum() + (b * ent).sum()).backward()
        want = mine(full_logits.grad.transpose(0, -1)).transpose(0, -1)
        torch.testing.assert_close(shard.grad, want, rtol=1e-5, atol=1e-6)
    counted = TPGroup(dist.group.WORLD, world, rank)
    with torch.no_grad():
        token_logprobs_and_entropy(h, targets, mine(w), group=counted, chunk=4, **padded)
    assert counted.counter.sent["all_reduce"] > 0  # the model's TPGroup counts these collectives


def test_vocab_parallel_logprobs_and_entropy_equal_one_process():
    run_workers(_worker, 2, timeout=120)
