"""Pretrained weights straight into a parallel layout: each rank fills only the pieces it holds (tensor
shards, pipeline stages, ZeRO-3 shards), and the logits equal transformers' on the same weights and
tokens. One launch of four gloo processes runs every layout and every kind of tiny model; GPT-2 (tied)
and the GQA Llama have 331 vocabulary rows, which t = 2 splits as 166 + 165 and a padding row."""

import pytest
import torch
import torch.distributed as dist

from megaloom.config import load_config
from megaloom.interop import load_parallel_model
from megaloom.parallel.grid import Axis, ProcessGrid
from tests.tiny_pretrained import KINDS, VOCAB, make

from .launch import run_workers

TOKENS = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
ODD = 331  # a prime: the vocabulary of these kinds (the others have the even VOCAB)
ODD_KINDS = ("gpt2", "llama-gqa")
# (tp, pp, dp, zero): (2, 2), (2, 1) under ZeRO-3 over dp = 2, (1, 2) with dp = 2
LAYOUTS = [(2, 2, 1, 0), (2, 1, 2, 3), (1, 2, 2, 0)]


def _overrides(tp, pp, dp, zero):
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", f"parallel.zero={zero}",
            'parallel.schedule="gpipe"', "train.micro_batch=1", f"train.global_batch={pp * dp}"]


def _logits(pm, grid, tokens):
    """The full logits of `tokens` on the last pipeline stage (None elsewhere): stage by stage, hidden
    states sent over the pp group, vocabulary shards gathered over the tp group."""
    chunk = pm.model[0] if grid.pp > 1 else pm.model
    pp_ranks = grid.ranks(Axis.PP)
    x = tokens
    if grid.pp_rank > 0:
        x = torch.empty(*tokens.shape, chunk.cfg.hidden)
        dist.recv(x, src=pp_ranks[grid.pp_rank - 1])
    with torch.no_grad():
        y = chunk(x)
    if grid.pp_rank < grid.pp - 1:
        dist.send(y.contiguous(), dst=pp_ranks[grid.pp_rank + 1])
        return None
    if grid.tp > 1:
        parts = [torch.empty_like(y) for _ in range(grid.tp)]
        dist.all_gather(parts, y.contiguous(), group=grid.tp_group)
        y = torch.cat(parts, dim=-1)[..., :chunk.cfg.vocab_size]  # less the padding of the last shard
    return y


def _worker(rank, world, dirs, expected):
    for layout in LAYOUTS:
        tp, pp, dp, zero = layout
        grid = None
        for kind in KINDS:
            overrides = _overrides(*layout)
            if grid is None:  # one grid per layout, shared by the kinds (every rank creates every group)
                cfg = load_config(None, [f"model.pretrained={str(dirs[kind])!r}", *overrides])
                grid = ProcessGrid.build(tp, pp, dp, rank=rank, world_size=world, model=cfg.model)
            pm, _, cfg = load_parallel_model(dirs[kind], grid, torch.device("cpu"), overrides)
            if zero == 3:
                assert pm.fsdp is not None  # the parameters are dp shards: the pieces filled were too
            logits = _logits(pm, grid, TOKENS)
            if logits is not None:
                diff = (logits - expected[kind]).abs().max().item()
                if grid.dp_rank == 0 and grid.tp_rank == 0:  # one line per case (docs/interop.md, with -s)
                    print(f"parity {kind} (t, p, d, zero) = {layout}: max |megaloom - transformers| = {diff:.1e}")
                assert diff <= 1e-4, f"{kind} at (t, p, d, zero) = {layout}: max |megaloom - transformers| = {diff}"


def test_pretrained_logits_in_every_layout(tmp_path):
    from transformers import AutoModelForCausalLM

    dirs, expected = {}, {}
    for kind in KINDS:
        dirs[kind] = make(kind, tmp_path / kind, vocab=ODD if kind in ODD_KINDS else VOCAB)
        model = AutoModelForCausalLM.from_pretrained(dirs[kind], dtype=torch.float32).eval()
        with torch.no_grad():
            expected[kind] = model(TOKENS).logits
    run_workers(_worker, 4, dirs, expected, timeout=120)


def _smollm2_worker(rank, world, path, tokens, expected):
    overrides = _overrides(world, 1, 1, 0)
    cfg = load_config(None, [f"model.pretrained={str(path)!r}", *overrides])
    grid = ProcessGrid.build(world, 1, 1, rank=rank, world_size=world, model=cfg.model)
    pm, _, _ = load_parallel_model(path, grid, torch.device("cpu"), overrides)  # the GGUF is read whole per rank
    diff = (_logits(pm, grid, tokens) - expected).abs().max().item()
    if rank == 0:
        print(f"parity SmolLM2 GGUF (t, p) = ({world}, 1): max |megaloom - transformers' GGUF load| = {diff:.1e}")
    assert diff <= 1e-4, f"SmolLM2 at tp = {world}: max |megaloom - transformers' GGUF load| = {diff}"


@pytest.mark.slow
def test_smollm2_gguf_tensor_parallel_equals_transformers():
    """tp = 3: SmolLM2's 9 heads and 3 key/value heads split over 3 ranks (tp = 2 does not divide them)."""
    from megaloom.data.tokenizer import pretrained_tokenizer
    from tests.smollm2 import PROMPT, gguf_path, transformers_gguf_logits

    path = gguf_path()
    tokens = torch.tensor([pretrained_tokenizer(path).encode(PROMPT)])
    run_workers(_smollm2_worker, 3, path, tokens, transformers_gguf_logits(path, tokens), timeout=300)
