"""What PEFT composes with beyond the plain layouts (docs/finetuning.md, "What composes with what"), each
against the single-process run, fp32, in one launch of two gloo processes:

- QLoRA (an NF4 base) at tp = 2, pp = 2 and dp = 2 with ZeRO-3 (slow: ZeRO-2, plain dp, DoRA on an NF4
  base at tp = 2 and ZeRO-3, and a launch of four processes at tp = 2 with ZeRO-3 over dp = 2) equals
  the single-process QLoRA run: the loss and every adapter gradient to 1e-5, five AdamW steps to 1e-4;
  every rank's dequantised base is exactly its part of the single
  process's (megaloom/tune/qlora.py quantizes whole weights). The tiny Llama is 128 wide here, so that
  a tp rank's share of a row-parallel layer's inputs is whole NF4 blocks of 64; the 64-wide one stops
  with one line at tp = 2.
- DoRA's magnitudes initialised from the base under ZeRO-3 (FSDP2 holds dp parts of W, A, B) equal the
  single process's; QDoRA's (from the dequantised NF4 base, as PEFT: tests/unit/test_peft.py) at tp = 2
  and under ZeRO-3 too.
- LoRA dropout with full recomputation at tp = 2 equals the single process without recomputation (the
  recomputed blocks replay the adapters' masks; slow: with sequence parallelism too). tp = 1:
  tests/unit/test_peft.py.
"""

import pytest
import torch

from megaloom.config import load_config
from megaloom.errors import ConfigError
from megaloom.parallel.launch import LaunchEnv, start
from tests.peft_refs import adapter_state, compare, seeded_run, sets
from tests.tiny_pretrained import make

from .launch import run_workers

QLORA = ["peft.quantize_base='nf4'"]
DROPOUT = ["peft.dropout=0.1"]
SITES = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")


def _dense_base(parts) -> dict[str, torch.Tensor]:
    """Layer 0's base weights as this rank holds them, dequantised."""
    from megaloom.tune.peft import chunks_of

    out = {}
    for chunk in chunks_of(parts.model):
        if "0" not in chunk.layers:
            continue
        for site in SITES:
            owner, attr = site.split(".")
            w = getattr(getattr(chunk.layers["0"], owner), attr).weight
            local = w.to_local() if hasattr(w, "to_local") else w
            assert hasattr(local, "get_original_weight"), f"{site} is not NF4 but {type(local)}"
            out[site] = (w, local.get_original_weight())
    return out


def _magnitudes(directory, overrides, grid) -> dict[str, torch.Tensor]:
    """DoRA's magnitudes as `PeftHook.loaded` initialises them from the pretrained base, whole."""
    from megaloom.interop import PretrainedWeights
    from megaloom.train.assemble import setup_training
    from megaloom.train.sharded_state import model_entries
    from megaloom.tune.peft import PeftHook, chunks_of, peft_names
    from megaloom.tune.peft import whole as gathered

    cfg = load_config(None, overrides)
    hook = PeftHook(cfg)
    parts = setup_training(cfg, grid, torch.device("cpu"), adapt=hook)
    PretrainedWeights(cfg.model)(model_entries(parts.model, lambda q: not q.requires_grad))
    hook.loaded(parts.model, fresh=True)
    params = {n: q for c in chunks_of(parts.model) for n, q in c.named_parameters()}
    out = {}
    for name, (key, spec) in peft_names(parts.model, cfg).items():
        if name.endswith("magnitude"):
            shard = gathered(params[name]).detach()  # ZeRO-3: the dp parts gathered
            if spec is not None and grid.tp > 1:
                pieces = [torch.empty_like(shard) for _ in range(grid.tp)]
                torch.distributed.all_gather(pieces, shard.contiguous(), group=grid.tp_group)
                shard = spec.assemble(pieces)
            out[key] = shard.clone()
    return out


def _check_qlora(rank, world, dirs, refs, layout, methods, grid) -> None:
    """QLoRA in `layout` equals the single-process QLoRA run, and every rank's dequantised base is
    exactly its part of the single process's."""
    from megaloom.tune.peft import dp_slices

    for method in methods:
        ours = seeded_run(dirs["wide"], method, QLORA, refs[method, "state"], grid=grid, **layout)
        d = compare(ours, refs[method, "qlora"], f"qlora {method} {layout}")
        for site, (w, dense) in _dense_base(ours[2]).items():
            want = refs[method, "base"][site]
            spec = getattr(w, "shard_spec", None)
            want = spec.take(want) if spec is not None and grid.tp > 1 else want
            want = want[dp_slices(w)] if hasattr(w, "device_mesh") else want
            assert torch.equal(dense, want), f"qlora {layout}: {site}'s dequantised base differs"
        if rank == world - 1:
            print(f"qlora {method} {layout} vs one process: loss {d[0]:.1e}, gradients {d[1]:.1e}, "
                  f"5 AdamW steps {d[2]:.1e}")


def _worker(rank, world, dirs, refs, slow):
    layouts = [dict(tp=2), dict(pp=2), dict(dp=2, zero=3)] + ([dict(dp=2, zero=2), dict(dp=2)] if slow else [])
    for layout in layouts:
        grid, _ = start(load_config(None, sets(dirs["wide"], "lora", "llama", **layout)), LaunchEnv(rank, world))
        methods = ["lora", "dora"] if slow and layout in (dict(tp=2), dict(dp=2, zero=3)) else ["lora"]
        _check_qlora(rank, world, dirs, refs, layout, methods, grid)
        if layout == dict(tp=2):
            # o_proj: 32 of 64 inputs a rank; load_config stops it, before a model is built
            with pytest.raises(ConfigError, match="cuts NF4's blocks of 64"):
                seeded_run(dirs["narrow"], "lora", QLORA, refs["narrow_state"], grid=grid, tp=2)
            for seq in [False, True] if slow else [False]:
                ours = seeded_run(dirs["wide"], "lora", [*DROPOUT, "train.recompute='full'"], refs["lora", "state"],
                                  grid=grid, tp=2, sp=seq)
                d = compare(ours, refs["dropout"], f"lora dropout, recompute full, tp = 2, sp = {seq}")
                if rank == world - 1:
                    print(f"lora dropout recompute full tp = 2 sp = {seq} vs one process without: loss {d[0]:.1e}, "
                          f"gradients {d[1]:.1e}, 5 AdamW steps {d[2]:.1e}")
        if layout == dict(dp=2, zero=3):
            got = _magnitudes(dirs["wide"], sets(dirs["wide"], "dora", "llama", **layout), grid)
            diff = max((got[k] - refs["magnitudes"][k]).abs().max().item() for k in got)
            assert got.keys() == refs["magnitudes"].keys() and diff <= 1e-6, f"DoRA magnitudes under ZeRO-3: {diff}"
            if rank == world - 1:
                print(f"dora magnitudes from the base, ZeRO-3 vs one process: {diff:.1e}")
        if layout in (dict(tp=2), dict(dp=2, zero=3)):  # QDoRA: from the dequantised NF4 base
            got = _magnitudes(dirs["wide"], [*sets(dirs["wide"], "dora", "llama", **layout), *QLORA], grid)
            diff = max((got[k] - refs["qdora_magnitudes"][k]).abs().max().item() for k in got)
            assert got.keys() == refs["qdora_magnitudes"].keys() and diff <= 1e-6, f"QDoRA magnitudes {layout}: {diff}"
            if rank == world - 1:
                print(f"qdora magnitudes from the NF4 base, {layout} vs one process: {diff:.1e}")


def _worker_tp_zero3(rank, world, dirs, refs):
    layout = dict(tp=2, dp=2, zero=3)
    grid, _ = start(load_config(None, sets(dirs["wide"], "lora", "llama", **layout)), LaunchEnv(rank, world))
    _check_qlora(rank, world, dirs, refs, layout, ["lora", "dora"], grid)
    for extra, want in (([], "magnitudes"), (QLORA, "qdora_magnitudes")):
        got = _magnitudes(dirs["wide"], [*sets(dirs["wide"], "dora", "llama", **layout), *extra], grid)
        diff = max((got[k] - refs[want][k]).abs().max().item() for k in got)
        assert diff <= 1e-6, f"DoRA {extra} magnitudes at tp = 2 under ZeRO-3: {diff}"


def _refs(tmp_path, slow):
    """The single-process runs every layout is compared with."""
    wide = make("llama-gqa", tmp_path / "wide", layers=2, hidden=128, ffn=128)
    narrow = make("llama-gqa", tmp_path / "narrow", layers=2)
    grid, _ = start(load_config(None, sets(wide, "lora", "llama")), LaunchEnv(0, 1))
    refs = {"narrow_state": adapter_state(narrow, "lora")}
    for method in ["lora", "dora"] if slow else ["lora"]:
        refs[method, "state"] = adapter_state(wide, method)
        ours = seeded_run(wide, method, QLORA, refs[method, "state"], grid=grid)
        refs[method, "qlora"] = {"losses": ours[0], "grads": ours[1]}
        refs[method, "base"] = {site: dense for site, (_, dense) in _dense_base(ours[2]).items()}
    nodrop = seeded_run(wide, "lora", [], refs["lora", "state"], grid=grid)
    ours = seeded_run(wide, "lora", DROPOUT, refs["lora", "state"], grid=grid)
    d = max((ours[1][k] - nodrop[1][k]).abs().max().item() for k in ours[1])
    assert d > 1e-4, f"LoRA dropout 0.1 changes the adapter gradients by {d} only: are masks drawn?"
    refs["dropout"] = {"losses": ours[0], "grads": ours[1]}
    refs["magnitudes"] = _magnitudes(wide, sets(wide, "dora", "llama"), grid)
    refs["qdora_magnitudes"] = _magnitudes(wide, [*sets(wide, "dora", "llama"), *QLORA], grid)
    d = max((refs["qdora_magnitudes"][k] - refs["magnitudes"][k]).abs().max().item() for k in refs["magnitudes"])
    assert d > 1e-4, f"QDoRA's magnitudes differ from the full-precision base's by {d} only"
    return {"wide": wide, "narrow": narrow}, refs


def test_qlora_dora_zero3_and_recomputed_dropout_equal_one_process(tmp_path):
    dirs, refs = _refs(tmp_path, slow=False)
    run_workers(_worker, 2, dirs, refs, False, timeout=600)


@pytest.mark.slow
def test_qlora_every_layout_and_dora_on_nf4_equal_one_process(tmp_path):
    dirs, refs = _refs(tmp_path, slow=True)
    run_workers(_worker, 2, dirs, refs, True, timeout=900)


@pytest.mark.slow
def test_qlora_and_dora_at_tp2_with_zero3_equal_one_process(tmp_path):
    """Four processes: the NF4 base's tp part split again over dp (FSDP2), DoRA's magnitudes too."""
    dirs, refs = _refs(tmp_path, slow=True)
    run_workers(_worker_tp_zero3, 4, dirs, refs, timeout=900)
