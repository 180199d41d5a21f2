"""Packed sequences (data.packing): positions restart and attention stays inside each document, so every
document's loss and gradients in a packed row equal those of the document alone; the unpacked path
builds no mask."""

import pytest
import torch

from megaloom.config import ModelConfig
from megaloom.model import build_model
from megaloom.model.layers import Packing
from megaloom.model.recompute import set_recompute

CFGS = {
    "gpt2": dict(family="gpt2", layers=2, hidden=32, heads=4, vocab_size=64, seq_len=24),
    "llama-gqa": dict(family="llama", layers=2, hidden=32, heads=4, kv_heads=2, vocab_size=64, seq_len=24),
}
LENGTHS = (6, 9, 5)  # three documents, then 4 tokens of padding: 24 inputs


def test_positions_and_mask_from_document_ids():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    p = Packing.from_docs(docs)
    assert p.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert p.mask.shape == (2, 1, 6, 6)
    assert p.mask[0, 0, 4].tolist() == [False, False, False, True, True, False]
    assert torch.equal(p.mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    assert Packing.from_docs(torch.tensor([[0, 0, 1, 0]])).positions.tolist() == [[0, 1, 0, 0]]  # runs, not ids


def _packed(cfg):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENGTHS]
    pad = cfg.seq_len + 1 - sum(LENGTHS)
    row = torch.cat([*docs, torch.zeros(pad, dtype=torch.long)])
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate((*LENGTHS, pad))])
    return docs, row, ids


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("name", list(CFGS))
def test_each_document_in_a_packed_row_equals_itself_alone(name, recompute):
    cfg = ModelConfig(**CFGS[name])
    docs, row, ids = _packed(cfg)
    x, docs_x = row[None, :-1], ids[None, :-1]
    packed, alone = build_model(cfg, 0), build_model(cfg, 0)
    set_recompute(packed, recompute)
    start = 0
    for tokens in docs:
        y = torch.full((cfg.seq_len,), -100)
        y[start:start + len(tokens) - 1] = tokens[1:]  # this document's targets only
        loss_p = packed(x, y[None], docs=docs_x) * (len(tokens) - 1)  # summed, so gradients add up
        loss_a = alone(tokens[None, :-1], tokens[None, 1:]) * (len(tokens) - 1)
        torch.testing.assert_close(loss_p, loss_a, rtol=1e-6, atol=1e-6)
        loss_p.backward()
        loss_a.backward()
        start += len(tokens)
    for (n, a), b in zip(packed.named_parameters(), alone.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():  # and the logits of every document's tokens
        logits = packed(x, docs=docs_x)[0]
        start = 0
        for tokens in docs:
            torch.testing.assert_close(logits[start:start + len(tokens)], alone(tokens[None])[0], rtol=1e-5, atol=1e-5)
            start += len(tokens)


def test_unpacked_path_builds_no_mask(monkeypatch):
    cfg = ModelConfig(**CFGS["llama-gqa"])
    model = build_model(cfg, 0)
    x = torch.randint(0, 64, (2, 24))
    monkeypatch.setattr(Packing, "from_docs", lambda docs: pytest.fail("the unpacked forward built a Packing"))
    model(x, x).backward()
    with pytest.raises(ValueError, match="KV cache"):
        monkeypatch.undo()
        model(x[:, :4], cache=model.new_cache(2), docs=torch.zeros(2, 4, dtype=torch.long))
