"""LoRA, DoRA and QLoRA (docs/finetuning.md) against PEFT + transformers and torchao, in one process:
the loss, adapter gradients and five AdamW steps equal PEFT's at (t, p) = (1, 1) (the parallel layouts:
tests/distributed/test_peft_parallel.py); a LoRA run's checkpoint holds the adapters only, resumes
exactly and refuses another base; its export loads in PEFT with equal logits, a PEFT-saved adapter
loads through peft.init with equal logits, merged equals unmerged; an NF4 base computes with torchao's
dequantised weight; LoRA dropout with full recomputation equals the run without; bad [peft] settings
stop with one line."""

import itertools
import json
import shutil

import pytest
import torch

from megaloom.cli import main
from megaloom.config import load_config
from megaloom.errors import ConfigError
from megaloom.interop import load_model
from megaloom.train.checkpoint import latest_checkpoint, saved_keys
from tests.peft_refs import TOKENS, adapter_state, compare, megaloom_run, peft_model, reference, seeded_run, sets
from tests.tiny_pretrained import make

QUIET = ["log.progress=false", "log.tensorboard=false", "log.plot=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_tiny")
    return {kind: make(kind, root / kind, layers=2) for kind in ("llama-gqa", "gpt2")}


@pytest.mark.parametrize("kind,family,method", [
    ("llama-gqa", "llama", "lora"), pytest.param("llama-gqa", "llama", "dora", marks=pytest.mark.slow),
    pytest.param("gpt2", "gpt2", "lora", marks=pytest.mark.slow),
    pytest.param("gpt2", "gpt2", "dora", marks=pytest.mark.slow)])
def test_one_process_equals_peft(tiny, kind, family, method):
    overrides = sets(tiny[kind], method, family)
    ref = reference(tiny[kind], load_config(None, overrides))
    d = compare(megaloom_run(tiny[kind], overrides, ref["state"]), ref, f"{kind} {method}")
    print(f"peft parity {kind} {method} (t, p) = (1, 1): loss {d[0]:.1e}, gradients {d[1]:.1e}, "
          f"5 AdamW steps {d[2]:.1e}")  # docs/finetuning.md, with -s


def _train(run, directory, *extra, steps=2):
    args = [f"model.pretrained='{directory}'", "model.seq_len=32", f"train.steps={steps}", "train.global_batch=2",
            "train.micro_batch=2", "train.lr=0.01", "train.warmup=0", "train.eval_batches=1", "train.samples=0",
            "data.max_bytes=60000", "data.val_fraction=0.3", f"data.dir='{run.parent / 'corpus'}'", "log.every=1",
            "peft.method='lora'", "peft.rank=4", "peft.targets=['q_proj','v_proj','o_proj','up_proj','down_proj']",
            *QUIET, *extra]
    assert main(["train", "--run-dir", str(run), *[a for s in args for a in ("--set", s)]]) == 0


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_checkpoint_resume_export_merge(tiny, tmp_path, capsys):
    """One LoRA run from a pretrained tiny Llama, end to end."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny["llama-gqa"]
    run = tmp_path / "run"
    _train(run, base, "checkpoint.every=2", steps=4)
    keys = saved_keys(latest_checkpoint(run))
    model_keys = [k for k in keys if k.startswith("model/")]
    assert model_keys and all(".lora." in k for k in model_keys), model_keys  # the base is not duplicated
    assert "peft_base" in keys
    # resume: a copy stopped after step 2 continues to the same losses
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    _train(resumed, base, "checkpoint.every=2", steps=4)
    assert _losses(resumed) == pytest.approx(_losses(run), abs=1e-6)
    # generate on the run directory: the base from model.pretrained with the checkpoint's adapters
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    # the adapters through PEFT: equal logits
    ours, _, _ = load_model(run)
    with torch.no_grad():
        logits = ours(TOKENS[:, :32])
    out = tmp_path / "adapter"
    assert main(["convert", str(run), str(out), "--to", "peft"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        diff = (theirs(input_ids=TOKENS[:, :32]).logits - logits).abs().max().item()
    assert diff <= 1e-5, f"exported adapter in PEFT: max |logit difference| = {diff}"
    with capsys.disabled():
        print(f"peft export: PEFT's logits of the exported adapter, max |difference| {diff:.1e}")
    # merged equals unmerged
    merged = tmp_path / "merged"
    assert main(["convert", str(run), str(merged), "--to", "hf", "--merge"]) == 0
    with torch.no_grad():
        diff = (AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(TOKENS[:, :32]).logits
                - logits).abs().max().item()
    assert diff <= 1e-5, f"merged model: max |logit difference| = {diff}"
    with capsys.disabled():
        print(f"peft merge: the merged model in transformers vs megaloom's unmerged, max |difference| {diff:.1e}")
    # the same adapters on another base (the same sizes, other weights): one line
    other = make("llama-gqa", tmp_path / "other", layers=2, seed=1)
    capsys.readouterr()
    with pytest.raises(AssertionError):
        _train(resumed, other, "checkpoint.every=2", f"data.dir='{tmp_path / 'corpus-other'}'", steps=6)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another base model: hash is" in err[0], err
    # so does reading the adapters for eval or generate on that base (interop's fill_model, load_peft_run)
    with pytest.raises(ConfigError, match="another base model: hash is"):
        load_model(run, overrides=[f"model.pretrained='{other}'"])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_saved_adapter_loads_through_peft_init(tiny, tmp_path, method):
    base = tiny["llama-gqa"]
    cfg = load_config(None, sets(base, method, "llama"))
    theirs = peft_model(base, cfg).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours, _, _ = load_model(base)
    from megaloom.tune.peft import PeftHook

    hook = PeftHook(load_config(None, [f"model.pretrained='{base}'", f"peft.init='{tmp_path / 'adapter'}'"]))
    assert hook.cfg.peft.method == method and hook.cfg.peft.rank == 4  # adapter_config.json sets them
    hook(ours, None)
    hook.loaded(ours, fresh=True)
    with torch.no_grad():
        diff = (ours.eval()(TOKENS[:, :32]) - theirs(input_ids=TOKENS[:, :32]).logits).abs().max().item()
    assert diff <= 1e-5, f"{method} adapter saved by PEFT, loaded by peft.init: max |logit difference| = {diff}"
    print(f"peft init: {method} adapter saved by PEFT, max |logit difference| {diff:.1e}")


@pytest.mark.parametrize("kind,family,method", [
    pytest.param("llama-gqa", "llama", "lora", marks=pytest.mark.slow),  # (also in the run test above)
    pytest.param("llama-gqa", "llama", "dora", marks=pytest.mark.slow),
    pytest.param("gpt2", "gpt2", "lora", marks=pytest.mark.slow), ("gpt2", "gpt2", "dora")])
def test_merged_equals_unmerged(tiny, kind, family, method):
    """`merge` folds the adapters into the fused weights (PEFT's merge formulas) with nonzero B and DoRA
    magnitudes: the logits stay."""
    from peft import get_peft_model_state_dict

    from megaloom.tune.lora import merge
    from megaloom.tune.peft import PeftHook, from_peft, peft_names, place

    cfg = load_config(None, sets(tiny[kind], method, family))
    state = get_peft_model_state_dict(peft_model(tiny[kind], cfg))
    model, _, _ = load_model(tiny[kind])
    hook = PeftHook(cfg)
    hook(model, None)
    hook.loaded(model, fresh=True)
    params = dict(model.named_parameters())
    for name, (key, _) in peft_names(model, cfg).items():
        place(params[name], from_peft(cfg, name, state[key]))
    with torch.no_grad():
        before = model(TOKENS[:, :32])
        merge(model)
        assert not any(".lora." in n for n, _ in model.named_parameters())
        diff = (model(TOKENS[:, :32]) - before).abs().max().item()
    assert diff <= 1e-5, f"{kind} {method}: merged vs unmerged max |logit difference| = {diff}"
    print(f"peft merge {kind} {method}: max |logit difference| {diff:.1e}")


def test_nf4_base_computes_with_torchaos_dequantised_weight(tiny):
    from torchao.quantization import to_nf4

    from megaloom.tune.peft import PeftHook
    from megaloom.tune.qlora import BLOCK, scaler_block

    base = tiny["llama-gqa"]
    model, _, _ = load_model(base)
    w = model.layers["0"].attn.qkv.weight.detach().clone()
    hook = PeftHook(load_config(None, [f"model.pretrained='{base}'", "peft.method='lora'",
                                       "peft.quantize_base='nf4'"]))
    hook(model, None)
    hook.loaded(model, fresh=True)
    qkv = model.layers["0"].attn.qkv
    assert hasattr(qkv.weight, "get_original_weight")
    x = torch.randn(2, 5, w.shape[1])
    want = torch.nn.functional.linear(x, to_nf4(w, BLOCK, scaler_block(w.numel() // BLOCK)).get_original_weight())
    torch.testing.assert_close(qkv(x), want, rtol=0, atol=1e-6)
    assert torch.isfinite(model(TOKENS[:, :32], TOKENS[:, 1:33])).all()


@pytest.mark.parametrize("sets_, words", [
    (["peft.method='lora'", "peft.targets=['c_attn']"], "a llama model does not have"),
    (["peft.method='lora'", "peft.rank=0"], "peft.rank = 0"),
    (["peft.quantize_base='nf4'"], "needs a peft.method"),
    (["peft.method='ia3'", "peft.quantize_base='nf4'"], "needs peft.method lora or dora"),
    (["peft.method='lora'", "peft.dropout=1.0"], "peft.dropout = 1.0"),
])
def test_bad_peft_settings_are_one_line(sets_, words):
    with pytest.raises(ConfigError, match=words) as e:
        load_config(None, ["model.family='llama'", *sets_])
    assert "\n" not in str(e.value)


@pytest.mark.slow  # the same check runs at tp = 2 in tests/distributed/test_peft_compose.py
def test_lora_dropout_with_full_recomputation_equals_without(tiny):
    """The recomputed blocks replay the adapters' dropout masks (megaloom/model/layers.py Block): with
    train.recompute = "full" the loss, the adapter gradients and five AdamW steps are those without
    (tp = 2, and that the masks matter: tests/distributed/test_peft_compose.py)."""
    base = tiny["llama-gqa"]
    state = adapter_state(base, "lora")
    plain = seeded_run(base, "lora", ["peft.dropout=0.1"], state)
    full = seeded_run(base, "lora", ["peft.dropout=0.1", "train.recompute='full'"], state)
    d = compare(full, {"losses": plain[0], "grads": plain[1]}, "lora dropout, recompute full vs none")
    assert d[0] == 0 and d[1] <= 1e-6, f"recomputed dropout masks differ: loss {d[0]}, gradients {d[1]}"
    print(f"lora dropout 0.1, recompute full vs none: loss {d[0]:.1e}, gradients {d[1]:.1e}, 5 steps {d[2]:.1e}")


@pytest.mark.slow
def test_qlora_equals_peft_on_the_nf4_dequantised_base(tiny):
    """QLoRA is LoRA on the base torchao's NF4 round trip gives: PEFT on transformers with those weights
    (megaloom's NF4 base dequantised, split into Hugging Face tensors) has the same loss, adapter
    gradients and five AdamW steps."""
    from megaloom.interop.export import hf_state

    base = tiny["llama-gqa"]
    overrides = [*sets(base, "lora", "llama"), "peft.quantize_base='nf4'"]
    cfg = load_config(None, overrides)
    first = reference(base, cfg)
    ours = megaloom_run(base, overrides, first["state"])
    model = ours[2].model
    assert hasattr(model.layers["0"].mlp.down.weight, "get_original_weight")
    dense = {n: (p.get_original_weight() if hasattr(p, "get_original_weight") else p).detach()
             for n, p in model.named_parameters() if ".lora." not in n}
    ref = reference(base, cfg, base=hf_state(cfg.model, dense))
    assert all(torch.equal(ref["state"][k], v) for k, v in first["state"].items())
    d = compare(ours, ref, "qlora")
    print(f"peft parity qlora llama-gqa: loss {d[0]:.1e}, gradients {d[1]:.1e}, 5 AdamW steps {d[2]:.1e}")


def test_qdora_magnitudes_are_the_dequantised_bases_as_in_peft(tiny):
    """QDoRA (DoRA on an NF4 base): the magnitudes start from the *dequantised* base's row norms, as PEFT's
    update_layer reads a 4-bit base (dequantize_module_weight), not the full-precision ones: they equal
    PEFT's DoRA on transformers holding megaloom's dequantised base, and so do the loss and the adapter
    gradients with them (A and B PEFT's, B nonzero)."""
    from megaloom.interop.export import hf_state
    from megaloom.tune.peft import PeftHook, from_peft, peft_names, place
    from tests.peft_refs import _peft_key, peft_loss, peft_model

    base = tiny["llama-gqa"]
    overrides = sets(base, "dora", "llama")

    def built(*extra):
        cfg = load_config(None, [*overrides, *extra])
        model, _, _ = load_model(base)
        hook = PeftHook(cfg)
        hook(model, None)
        hook.loaded(model, fresh=True)
        return model, cfg

    model, cfg = built("peft.quantize_base='nf4'")
    full_precision, _ = built()
    assert hasattr(model.layers["0"].mlp.down.weight, "get_original_weight")
    dense = {n: (p.get_original_weight() if hasattr(p, "get_original_weight") else p).detach()
             for n, p in model.named_parameters() if ".lora." not in n}
    theirs = peft_model(base, cfg, base=hf_state(cfg.model, dense), perturb_magnitudes=False)
    state = {_peft_key(n): q for n, q in theirs.named_parameters() if q.requires_grad}
    params, fp = dict(model.named_parameters()), dict(full_precision.named_parameters())
    names = peft_names(model, cfg)
    mags = [(n, key) for n, (key, _) in names.items() if n.endswith(".magnitude")]
    assert len(mags) == 2 * 7  # every targeted projection of both layers
    d_mag = max((params[n] - from_peft(cfg, n, state[k])).abs().max().item() for n, k in mags)
    d_fp = max((params[n] - fp[n]).abs().max().item() for n, _ in mags)
    assert d_mag <= 1e-6, f"QDoRA magnitudes differ from PEFT's on the dequantised base by {d_mag}"
    assert d_fp > 1e-4, f"the NF4 base's row norms differ from the full-precision ones by only {d_fp}"
    with torch.no_grad():  # PEFT's A and B (nonzero); the magnitudes stay megaloom's own
        for n, (key, _) in names.items():
            if not n.endswith(".magnitude"):
                place(params[n], from_peft(cfg, n, state[key]))
    ours = model(TOKENS[:, :32], TOKENS[:, 1:33])
    ours.backward()
    ref = peft_loss(theirs, TOKENS[:, :33])
    ref.backward()
    d_loss = abs(ours.item() - ref.item())
    d_grad = max((params[n].grad - from_peft(cfg, n, state[key].grad)).abs().max().item() for n, (key, _) in names.items())
    assert d_loss <= 1e-6 and d_grad <= 1e-6, f"QDoRA vs PEFT on the dequantised base: loss {d_loss}, gradients {d_grad}"
    print(f"qdora magnitudes vs PEFT on the dequantised base {d_mag:.1e} (vs full precision {d_fp:.1e}); loss "
          f"{d_loss:.1e}, gradients {d_grad:.1e}")


@pytest.mark.parametrize("sets_, words", [
    (["model.hidden=64", "model.heads=4", "parallel.tp=2"],  # o_proj: 32 of 64 inputs a rank
     "with parallel.tp = 2: a rank holds 64 x 32 of attn.proj's 64 x 64 weight, which cuts NF4's blocks of 64"),
    (["model.hidden=128", "model.heads=4", "model.ffn_hidden=96", "parallel.tp=2"],  # down_proj: 48 of 96
     "a rank holds 128 x 48 of mlp.down's 128 x 96 weight, which cuts NF4's blocks of 64"),
    (["model.hidden=128", "model.heads=4", "model.ffn_hidden=129", "parallel.tp=2"],
     r"parallel.tp = 2 does not divide mlp.up's blocks \(129, 129\) evenly"),
    (["model.hidden=36", "model.heads=2"], r"a base weight of shape \(108, 36\) has 3888 elements"),
    (["model.hidden=64", "model.heads=4", "parallel.zero=3", "parallel.dp=3", "train.global_batch=3",
      "train.micro_batch=1"], "splits attn.proj's 64 rows \\(per tp rank\\) over parallel.dp = 3"),
])
def test_nf4_layout_stops_at_config_loading(sets_, words):
    """The NF4 base's layout rules (megaloom/tune/nf4_layout.py, the ones qlora.py quantizes by) stop
    `load_config` with one line, before any model is built or loaded."""
    with pytest.raises(ConfigError, match=words) as e:
        load_config(None, ["model.family='llama'", "model.layers=2", "peft.method='lora'",
                           "peft.quantize_base='nf4'", *sets_])
    assert "\n" not in str(e.value)
    load_config(None, ["model.family='llama'", "model.layers=2", "peft.method='lora'", *sets_])  # fine without NF4


def test_nf4_layout_from_a_pretrained_model_stops_train_in_one_line(tiny, tmp_path, capsys):
    """`megaloom train` on the 64-wide tiny Llama at tp = 2 with an NF4 base: one line, nothing started
    (no run directory)."""
    args = [f"model.pretrained='{tiny['llama-gqa']}'", "peft.method='dora'", "peft.quantize_base='nf4'",
            "parallel.tp=2", *QUIET]
    assert main(["train", "--run-dir", str(tmp_path / "run"), *[a for s in args for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuts NF4's blocks of 64" in err[0], err
    assert not (tmp_path / "run").exists()


def test_nf4_layout_rules_equal_the_index_arithmetic():
    """nf4_layout's per-run rule for "a tp rank's part is whole NF4 blocks" agrees, on every rank, with
    the index check it stands for (each block of 64 of the part's row-major elements is one block of the
    whole weight: first element at a multiple of 64, last 63 after it)."""
    from megaloom.config import ModelConfig
    from megaloom.parallel.shard import ShardSpec
    from megaloom.tune.nf4_layout import BLOCK, _runs, _whole_blocks, site_shapes

    seen = set()
    shapes = [(4, 2, 64, 96, "llama"), (4, 4, 128, 128, "llama"), (6, 2, 96, 160, "llama"), (4, 4, 40, 160, "gpt2"),
              (8, 2, 256, 320, "llama"), (2, 1, 24, 48, "llama")]
    for (heads, kv, hidden, ffn, family), tp in itertools.product(shapes, (1, 2, 4)):
        m = ModelConfig(family=family, heads=heads, kv_heads=kv, hidden=hidden, ffn_hidden=ffn)
        for site, out_f, in_f, dim, blocks in site_shapes(m):
            if any(b % tp for b in blocks):
                continue
            for rank in range(tp):
                idx = torch.arange(out_f * in_f).view(out_f, in_f)
                part = ShardSpec((out_f, in_f), dim, blocks, rank, tp).take(idx).reshape(-1)
                whole = len(part) % BLOCK == 0 and bool((part[::BLOCK] % BLOCK == 0).all()) and torch.equal(
                    part.view(-1, BLOCK)[:, -1] - part.view(-1, BLOCK)[:, 0],
                    torch.full((len(part) // BLOCK,), BLOCK - 1))
                assert _whole_blocks(_runs(out_f, in_f, dim, blocks, tp, rank)) == whole, (m, site, tp, rank)
                seen.add((dim, whole))
    assert len(seen) == 4  # column- and row-parallel parts, whole and cut


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qlora_run_loads_for_eval_and_generate_on_its_nf4_base(tiny, tmp_path, method):
    """`megaloom eval` / `generate` (eval.load.load_for_inference) and interop.load_model of a QLoRA (QDoRA) run
    compute with the NF4 base the run trained on: the logits of the trainer's own model at its last step; so does
    its merged export (`convert --to hf --merge`: the dequantised NF4 base with the adapters folded in)."""
    from transformers import AutoModelForCausalLM

    from megaloom.eval.load import load_for_inference
    from megaloom.parallel.launch import LaunchEnv
    from tests.distributed.launch import train_config

    run = tmp_path / "run"
    args = [f"model.pretrained='{tiny['llama-gqa']}'", "model.seq_len=32", "train.steps=2", "train.global_batch=2",
            "train.micro_batch=2", "train.lr=0.01", "train.warmup=0", "train.eval_batches=1", "train.samples=0",
            "data.max_bytes=60000", "data.val_fraction=0.3", f"data.dir='{tmp_path / 'corpus'}'",
            "checkpoint.every=2", f"peft.method='{method}'", "peft.rank=4", "peft.quantize_base='nf4'", *QUIET]
    trainer = train_config(args, run, config=None)
    tokens = TOKENS[:, :32]
    with torch.no_grad():
        want = trainer.model.eval()(tokens)
        loaded = load_for_inference(run, LaunchEnv())
        for name, model in (("load_for_inference", loaded.pm.model), ("load_model", load_model(run)[0])):
            diff = (model(tokens) - want).abs().max().item()
            assert diff <= 1e-5, f"{method} + nf4 via {name}: max |logit difference| to the trainer's = {diff}"
        assert main(["convert", str(run), str(tmp_path / "merged"), "--to", "hf", "--merge"]) == 0
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        diff = (merged(input_ids=tokens).logits - want).abs().max().item()
        assert diff <= 1e-5, f"{method} + nf4 merged: max |logit difference| to the trainer's = {diff}"
        # `megaloom quantize` of the run quantizes the model the run computes with: its adapters folded into the
        # dequantised base, as the merged export holds it, so both quantize to the same model
        from megaloom.compress.store import load_quantized

        for source, out in ((run, "q-run"), (tmp_path / "merged", "q-merged")):
            assert main(["quantize", str(source), str(tmp_path / out), "--method", "int8-weight"]) == 0
        q_run, q_merged = (load_quantized(tmp_path / out)[0] for out in ("q-run", "q-merged"))
        torch.testing.assert_close(q_run(tokens), q_merged(tokens), rtol=0, atol=1e-5)
        # so does `megaloom prune`: the run's merged model is pruned, masks and all, as its merged export is
        from megaloom.train.checkpoint import full_tensors

        for source, out in ((run, "p-run"), (tmp_path / "merged", "p-merged")):
            assert main(["prune", str(source), str(tmp_path / out), "--method", "magnitude", "--sparsity", "0.5"]) == 0
        (w_run, m_run), (w_merged, m_merged) = ((full_tensors(tmp_path / out, "model/"), full_tensors(tmp_path / out,
                                                                                                   "mask/"))
                                                for out in ("p-run", "p-merged"))
        assert m_run.keys() == m_merged.keys() and len(m_run) > 0
        assert not any(".lora." in k or "magnitude" in k for k in w_run)  # the adapters are folded in, not kept
        for name, mask in m_run.items():
            assert torch.equal(mask, m_merged[name]), name
            torch.testing.assert_close(w_run[name], w_merged[name], rtol=0, atol=1e-6)
