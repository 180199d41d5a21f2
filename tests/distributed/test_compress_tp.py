"""Quantization under tensor parallelism (tp = 2, gloo): each rank quantizes the shards it holds with
megaloom.compress.quantize_model, and every shard's int8 / int4 values, scales and zero points equal,
bit for bit, the slice of torchao's quantization of the full single-device layer (column-parallel
qkv and up, row-parallel proj and down, whose per-row int8 scales span both ranks). A quantized
checkpoint written by one process loads at tp = 2 into the same shards, and its loss equals the
single-process quantized model's. train.keep_sparsity's masks of a pruned checkpoint land on the
right elements of each rank's shards."""

import warnings

import torch

from megaloom.compress.quantize import block_linears, quantize_model
from megaloom.compress.schemes import QuantScheme
from megaloom.config import load_config
from megaloom.parallel.grid import ProcessGrid
from megaloom.parallel.shard import ShardSpec
from tests.tiny_pretrained import VOCAB, make

from .launch import run_workers

SCHEMES = [("int8-weight", None), ("int8-dynamic", None), ("int4-weight", 16)]
TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
OVERRIDES = ["parallel.tp=2", "parallel.pp=1", "parallel.dp=1", "parallel.zero=0", "train.micro_batch=1",
             "train.global_batch=1"]


def _torchao_full(model, scheme):
    """{name: (qdata, scale, zero_point)} of torchao's quantize_ on each full single-device linear."""
    from torchao.quantization import quantize_

    out = {}
    for lin in block_linears(model):
        w = lin.module.weight.detach()
        full = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            full.weight.copy_(w)
        quantize_(full, scheme.torchao_config())
        out[lin.name] = (full.weight.qdata, full.weight.scale, full.weight.zero_point)
    return out


def _expected_shard(full, spec, row_parallel, rank):
    qdata, scale, zero = full
    q = spec.take(qdata)
    if not row_parallel:  # whole rows: the scales of this rank's rows, block by block
        take = ShardSpec(tuple(scale.shape), 0, spec.blocks, rank, spec.size).take
        return q, take(scale), take(zero)
    if scale.shape[1] == 1:  # a per-row scale spans both ranks' halves of the row: the full row's
        return q, scale, zero
    return q, scale.chunk(spec.size, dim=1)[rank], zero.chunk(spec.size, dim=1)[rank]


def _check(model, specs, expected, rank, what):
    for lin in block_linears(model):
        w = lin.module.weight
        want = _expected_shard(expected[lin.name], specs[lin.name], lin.row_parallel, rank)
        for field, got, ref in zip(("qdata", "scale", "zero_point"), (w.qdata, w.scale, w.zero_point), want):
            assert torch.equal(got, ref), f"{what}: {lin.name} {field} on rank {rank} differs from torchao's full layer"


def _keep_sparsity(grid, pruned, masks, rank):
    from megaloom.compress.sparsity import KeepSparsity
    from megaloom.interop import load_parallel_model

    pm, _, _ = load_parallel_model(pruned, grid, torch.device("cpu"), OVERRIDES)
    specs = {lin.name: lin.module.weight.shard_spec for lin in block_linears(pm.model)}
    hook = KeepSparsity()
    assert hook.start(pm.model, pruned).startswith("train.keep_sparsity: 16 weight matrices")
    with torch.no_grad():
        for lin in block_linears(pm.model):
            lin.module.weight.fill_(1.0)  # what training might have done to the pruned weights
    hook.apply(pm.model)
    for lin in block_linears(pm.model):
        expected = specs[lin.name].take(masks[lin.name].float())
        assert torch.equal(lin.module.weight.detach(), expected), f"{lin.name}: masks misplaced on rank {rank}"


def _worker(rank, world, hf, expected, saved, losses, pruned=None, masks=None):
    warnings.filterwarnings("ignore")
    from megaloom.compress.store import load_quantized_parallel
    from megaloom.interop import load_parallel_model

    cfg = load_config(None, [f"model.pretrained={str(hf)!r}", *OVERRIDES])
    grid = ProcessGrid.build(2, 1, 1, rank=rank, world_size=world, model=cfg.model)
    for method, group in SCHEMES:
        scheme = QuantScheme.parse(method, group)
        pm, _, _ = load_parallel_model(hf, grid, torch.device("cpu"), OVERRIDES)
        specs = {lin.name: lin.module.weight.shard_spec for lin in block_linears(pm.model)}
        quantize_model(pm.model, scheme, pm.tp)
        _check(pm.model, specs, expected[method], rank, f"{method} quantized at tp = 2")
    for method, path in saved.items():
        pm, _, _ = load_quantized_parallel(path, grid, torch.device("cpu"), OVERRIDES)
        _check(pm.model, specs, expected[method], rank, f"{method} checkpoint loaded at tp = 2")
        with torch.no_grad():
            loss = pm.model(TOKENS[:, :-1], TOKENS[:, 1:]).item()
        assert abs(loss - losses[method]) < 1e-5, f"{method} at tp = 2: loss {loss} vs one process {losses[method]}"
    _keep_sparsity(grid, pruned, masks, rank)


def test_quantized_shards_equal_torchao_full_layers(tmp_path):
    warnings.filterwarnings("ignore")
    from megaloom.compress.store import load_quantized, save_quantized
    from megaloom.interop import load_model

    hf = make("llama-gqa", tmp_path / "hf")  # 4 heads, 2 key/value heads, ffn 96: down is 48 features per rank
    expected, saved, losses = {}, {}, {}
    for method, group in SCHEMES:
        scheme = QuantScheme.parse(method, group)
        model, tok, cfg = load_model(hf)
        expected[method] = _torchao_full(model, scheme)
        if method != "int8-dynamic":  # the checkpoint path, single process -> tp = 2
            quantize_model(model, scheme)
            saved[method] = tmp_path / method
            save_quantized(model, cfg, tok, saved[method], {**scheme.record(), "source": str(hf)})
            reloaded, _, _ = load_quantized(saved[method])
            with torch.no_grad():
                losses[method] = reloaded(TOKENS[:, :-1], TOKENS[:, 1:]).item()
                assert abs(losses[method] - model(TOKENS[:, :-1], TOKENS[:, 1:]).item()) < 1e-6
    from megaloom.compress.prune import Sparsity, magnitude_mask
    from megaloom.compress.store import save_pruned

    model, tok, cfg = load_model(hf)
    masks = {}
    with torch.no_grad():
        for lin in block_linears(model):
            masks[lin.name] = magnitude_mask(lin.module.weight, Sparsity.parse(None, "2:4"))
            lin.module.weight.mul_(masks[lin.name])
    save_pruned(model, cfg, tok, tmp_path / "pruned", masks, {"method": "magnitude"})
    run_workers(_worker, 2, hf, expected, saved, losses, tmp_path / "pruned", masks, timeout=180)
