"""The pipeline program of Megatron-LM as the paper ran it (2021): its passes and its blocking p2p batches.

Megatron-LM's `schedules.py` of that time (forward_backward_pipelining_without_interleaving and
forward_backward_pipelining_with_interleaving) runs each rank's passes in a fixed order and, between
them, calls `p2p_communication._communicate`: one `batch_isend_irecv` of the sends and receives of
that point, waited for and followed by `torch.cuda.synchronize()`. Which transfers share a batch is
the program's own choice (send_forward_recv_backward, send_forward_backward_recv_forward_backward,
...), so a rank stands still at each batch until every transfer in it is done, and a transfer cannot
finish before the peer posts its end. `megatron_plan` writes that program down per rank; the
simulator (`simulator._run_blocking`) times it.

A transfer is named (sender, receiver, direction, n): the n-th message of that kind between the two
ranks. NCCL matches a pair's messages in posting order, so the n-th send meets the n-th receive.
Neighbours are a ring: the last rank sends chunk c's output to rank 0, where it is chunk c+1's input.
"""

from __future__ import annotations

from functools import lru_cache

FORWARD, BACKWARD = 0, 1  # direction of a transfer (activations, gradients); also the pass codes
Transfer = tuple[int, int, int, int]  # (sender, receiver, direction, n)
Step = tuple  # ("F" | "B", microbatch, chunk) or ("batch", (Transfer, ...))


@lru_cache(maxsize=64)
def megatron_plan(p: int, m: int, v: int) -> tuple[tuple[Step, ...], ...]:
    """Per pipeline rank, Megatron-LM 2021's passes and p2p batches in execution order, for p > 1 ranks,
    m microbatches and v model chunks per rank (v = 1: the non-interleaved 1F1B program)."""
    if p < 2:
        raise ValueError(f"a pipeline program needs p >= 2 ranks, got {p}")
    ranks = [_Rank(r, p) for r in range(p)]
    for rank in ranks:
        (_one_f_one_b if v == 1 else _interleaved)(rank, p, m, v)
    return tuple(tuple(rank.steps) for rank in ranks)


class _Rank:
    """One rank's steps as they are written, naming each transfer by its place in its pair's order."""

    def __init__(self, r: int, p: int):
        self.r, self.p, self.steps = r, p, []
        self.sent: dict[tuple[int, int], int] = {}
        self.received: dict[tuple[int, int], int] = {}

    def compute(self, kind: str, microbatch: int, chunk: int) -> None:
        self.steps.append((kind, microbatch, chunk))

    def batch(self, send_prev: bool = False, recv_prev: bool = False, send_next: bool = False,
              recv_next: bool = False) -> None:
        """One `_communicate`: gradients go to the previous rank, activations to the next."""
        prev, nxt = (self.r - 1) % self.p, (self.r + 1) % self.p
        ops = []
        if send_prev:
            ops.append(self._send(prev, BACKWARD))
        if recv_prev:
            ops.append(self._recv(prev, FORWARD))
        if send_next:
            ops.append(self._send(nxt, FORWARD))
        if recv_next:
            ops.append(self._recv(nxt, BACKWARD))
        if ops:
            self.steps.append(("batch", tuple(ops)))

    def _send(self, to: int, direction: int) -> Transfer:
        n = self.sent.get((to, direction), 0)
        self.sent[to, direction] = n + 1
        return self.r, to, direction, n

    def _recv(self, src: int, direction: int) -> Transfer:
        n = self.received.get((src, direction), 0)
        self.received[src, direction] = n + 1
        return src, self.r, direction, n


def _one_f_one_b(rank: _Rank, p: int, m: int, v: int) -> None:
    """forward_backward_pipelining_without_interleaving: p - r - 1 warm-up forwards, 1F1B, cool-down."""
    r = rank.r
    first, last = r == 0, r == p - 1
    warmup = min(p - r - 1, m)
    remaining = m - warmup
    for i in range(warmup):
        rank.batch(recv_prev=not first)  # recv_forward
        rank.compute("F", i, 0)
        rank.batch(send_next=not last)  # send_forward
    if remaining:
        rank.batch(recv_prev=not first)
    for i in range(remaining):
        rank.compute("F", warmup + i, 0)
        rank.batch(send_next=not last, recv_next=not last)  # send_forward_recv_backward
        rank.compute("B", i, 0)
        # send_backward on the last iteration, else send_backward_recv_forward
        rank.batch(send_prev=not first, recv_prev=not first and i < remaining - 1)
    for i in range(warmup):
        rank.batch(recv_next=not last)  # recv_backward
        rank.compute("B", remaining + i, 0)
        rank.batch(send_prev=not first)  # send_backward


def _interleaved(rank: _Rank, p: int, m: int, v: int) -> None:
    """forward_backward_pipelining_with_interleaving (m a multiple of p): (p - r - 1)·2 + (v - 1)·p
    warm-up forwards, then one forward and one backward per step with one batch in all four
    directions, then the cool-down backwards."""
    if m % p:
        raise ValueError(f"the interleaved program needs microbatches ({m}) to be a multiple of p ({p})")
    r = rank.r
    first_rank, last_rank = r == 0, r == p - 1
    total = m * v
    all_warmup = m == p
    warmup = total if all_warmup else min((p - r - 1) * 2 + (v - 1) * p, total)
    remaining = total - warmup

    def chunk(k: int, forward: bool) -> int:
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def microbatch(k: int) -> int:
        return k // (p * v) * p + k % p

    def stage(k: int, forward: bool) -> int:
        return chunk(k, forward) * p + r

    last_stage = p * v - 1
    rank.batch(recv_prev=not first_rank)  # recv_forward for chunk 0
    for k in range(warmup):
        rank.compute("F", microbatch(k), chunk(k, True))
        recv_prev = not (first_rank and chunk(k + 1, True) == 0) and k != total - 1
        send = stage(k, True) != last_stage
        if k == warmup - 1 and not all_warmup:
            rank.batch(send_next=send, recv_prev=recv_prev, recv_next=not last_rank)
        else:
            rank.batch(send_next=send, recv_prev=recv_prev)
    for k in range(remaining):
        fk = k + warmup
        rank.compute("F", microbatch(fk), chunk(fk, True))
        rank.compute("B", microbatch(k), chunk(k, False))
        recv_prev = chunk(fk - (p - 1), True) != v - 1 if first_rank else True
        recv_next = chunk(k - (p - 1), False) != 0 if last_rank else True
        if k == remaining - 1:
            recv_prev = False
        rank.batch(send_prev=stage(k, False) != 0, recv_prev=recv_prev,
                   send_next=stage(fk, True) != last_stage, recv_next=recv_next)
    if all_warmup:
        rank.batch(recv_next=not last_rank)  # recv_backward
    for k in range(remaining, total):
        rank.compute("B", microbatch(k), chunk(k, False))
        recv_next = not (last_rank and chunk(k + 1, False) == v - 1) and k != total - 1
        rank.batch(send_prev=stage(k, False) != 0, recv_next=recv_next)
