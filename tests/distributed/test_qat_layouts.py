"""Quantization-aware training ([qat]) on the parallel engine: tp = 2 equals one process (one launch of two
processes; four SFT steps: the first step's loss and gradient norm to 1e-6, the LoRA run's every step and
validation loss to 1e-5, the fully trained runs' later losses to 1e-3, see `_same`), for the scales that
span the two ranks of a row-parallel layer as well as the local ones:

- int8-dynamic-act-int4-weight with sequence parallelism: per-token int8 activations (a row-parallel
  input's token min / max all-reduced over tp) and int4 weights in groups of 16 inside each rank's slice;
- int8-weight, one scale per output row (a row-parallel row's min / max all-reduced over tp);
- int4-weight with LoRA on all seven projections (the fake-quantized frozen base, high-precision adapters).

Then `megaloom quantize RUN OUT --from-qat` of the single-process LoRA run (adapters merged into the base,
then quantized) gives the logits of the fake-quantized forward of the merged model, and its int4 weights
are that forward's weights exactly. (slow) Distillation with QAT at tp = 2 (int8 activations), pp = 2 and
ZeRO-3 over dp = 2 (int4 weights) equal one process as well (step 1 to 1e-6, later losses to 1e-3).
"""

import pytest
import torch

from megaloom.observe.metrics import read_metrics

from ..unit.test_sft_data import write_conversations
from .launch import run_workers, train_config, train_configs

LORA = ["peft.method='lora'", "peft.rank=4", "peft.alpha=8.0", "train.lr=1e-2",
        "peft.targets=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']"]
CASES = {
    "i8i4-sp": ["qat.scheme='int8-dynamic-act-int4-weight'", "qat.group_size=16"],
    "int8-row": ["qat.scheme='int8-weight'"],
    "int4-lora": ["qat.scheme='int4-weight'", "qat.group_size=16", *LORA],
}
TP2 = {"i8i4-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"], "int8-row": ["parallel.tp=2"],
       "int4-lora": ["parallel.tp=2"]}


def _sets(tmp, *extra):
    return ["model.family='llama'", "model.layers=2", "model.hidden=32", "model.heads=4", "model.vocab_size=320",
            "model.seq_len=64", "train.objective='sft'", f"data.sources=['{tmp / 'conv.jsonl'}']",
            f"data.dir='{tmp / 'corpus'}'", "data.vocab_size=300", "data.val_fraction=0.2", "data.packing=true",
            "train.global_batch=4", "train.micro_batch=2", "train.steps=4", "train.eval_every=4",
            "train.eval_batches=2", "train.warmup=1", "train.lr=1e-3", "log.every=1", "log.progress=false",
            "log.tensorboard=false", "log.plot=false", *extra]


def _same(tmp, name, later):
    """Step 1 (the same weights on both layouts) to 1e-6: the fake-quantized forward and backward at tp = 2
    are the one-process ones (without the all-reduced scales the int8 cases differ by 3e-5 in the loss and
    1e-4 in the gradient norm). Later steps to `later`: once the weights are updated, float rounding of the
    tp sums (1e-7 in this run without [qat]) moves a few values across a rounding boundary of the fake
    quantization, each one a whole quantization step apart (docs/compression.md): there the losses are
    compared to `later`, not the gradient norms (1e-3 apart after four steps of int8 activations)."""
    one, two = read_metrics(tmp / name), read_metrics(tmp / f"{name}-tp2")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4], name
    for a, b in zip(one, two):
        tol = 1e-6 if a["step"] == 1 else later
        for key in ("loss", "grad_norm") if tol <= 1e-5 else ("loss",):  # a flip moves the gradient norm more
            assert b[key] == pytest.approx(a[key], rel=tol, abs=tol), (name, key, a["step"])
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=later, abs=later), name
    assert one[-1]["loss"] < one[0]["loss"], name


def _plain_logits_differ(tmp):
    """The QAT run trains another model than the same run without [qat] (the fake quantization acts)."""
    plain = read_metrics(tmp / "plain")
    qat = read_metrics(tmp / "int8-row")
    assert abs(plain[0]["loss"] - qat[0]["loss"]) > 1e-6


def _from_qat_equals_fake_quant_forward(tmp):
    from megaloom.cli import main
    from megaloom.compress.qat import FakeQuantLinear, prepare, qat_scheme
    from megaloom.compress.quantize import block_linears
    from megaloom.compress.store import load_quantized
    from megaloom.interop.load import load_model
    from megaloom.tune.lora import merge

    run, out = tmp / "int4-lora", tmp / "int4-lora-q"
    model, _, cfg = load_model(run)
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(tokens)  # the training forward: fq(W) x + s B A x
        merge(model)
        prepare(model, qat_scheme(cfg), None)  # the fake-quantized forward of W + s B A
        want = model(tokens)
    assert main(["quantize", str(run), str(out), "--from-qat"]) == 0
    q, _, qcfg = load_quantized(out)
    assert qcfg.peft.method == "none" and qcfg.qat.scheme == "none"
    with torch.no_grad():
        got = q(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for lin, fq in zip(block_linears(q), block_linears(model)):
        assert isinstance(fq.module, FakeQuantLinear)
        w = fq.module.weight_fake_quantizer(fq.module.weight)
        assert torch.equal(lin.module.weight.dequantize(), w), lin.name
    # the adapters were trained (B moved from zero), so merging them changed the model
    assert (trained - want).abs().max() > 1e-4


@pytest.mark.slow
def test_qat_tp2_equals_one_process(tmp_path):
    write_conversations(tmp_path / "conv.jsonl", 48)
    for name, extra in CASES.items():
        train_config(_sets(tmp_path, *extra), tmp_path / name)
    train_config(_sets(tmp_path), tmp_path / "plain")
    runs = [(_sets(tmp_path, *CASES[name], *TP2[name]), tmp_path / f"{name}-tp2") for name in CASES]
    run_workers(train_configs, 2, runs, timeout=600)
    _same(tmp_path, "int4-lora", 1e-5)  # a frozen base: the fake-quantized weights never move
    _same(tmp_path, "i8i4-sp", 1e-3)
    _same(tmp_path, "int8-row", 1e-3)
    _plain_logits_differ(tmp_path)
    _from_qat_equals_fake_quant_forward(tmp_path)


@pytest.mark.slow
def test_qat_distill_tp2_equals_one_process(tmp_path):
    """train.objective = "distill" with QAT of the student (the teacher stays in high precision)."""
    from tests.tiny_pretrained import make

    make("llama-tied", tmp_path / "teacher", layers=2)
    sets = ["model.family='llama'", "model.layers=2", "model.hidden=64", "model.heads=4", "model.ffn_hidden=96",
            "model.vocab_size=320", "model.head='tied'", "model.seq_len=32", "model.max_positions=64",
            "model.rope_theta=500.0", "train.objective='distill'", f"distill.teacher='{tmp_path / 'teacher'}'",
            "distill.init_from_teacher_layers=[0, 1]", "data.tokenizer='pretrained'", "data.max_bytes=30000",
            "data.val_fraction=0.2", f"data.dir='{tmp_path / 'corpus'}'", "train.global_batch=4",
            "train.micro_batch=2", "train.steps=3", "train.eval_every=3", "train.eval_batches=2", "train.warmup=1",
            "train.lr=3e-3", "log.every=1", "log.progress=false", "log.tensorboard=false", "log.plot=false",
            "qat.scheme='int8-dynamic-act-int4-weight'", "qat.group_size=16"]
    train_config(sets, tmp_path / "single")
    run_workers(train_configs, 2, [(sets + ["parallel.tp=2"], tmp_path / "tp2")], timeout=600)
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "tp2")
    for a, b in zip(one, two, strict=True):  # step 1 exact; then the rounding flips of `_same`
        for key in ("loss", "grad_norm", "distill/kd") if a["step"] == 1 else ("loss",):
            tol = 1e-6 if a["step"] == 1 else 1e-3
            assert b[key] == pytest.approx(a[key], rel=tol, abs=tol), (key, a["step"])


@pytest.mark.slow
def test_qat_pp2_and_zero3_equal_one_process(tmp_path):
    """The fake-quantized linears in pipeline chunks (pp = 2) and under ZeRO-3 (FSDP2 shards and gathers
    their weights) over dp = 2, int4 weights in groups of 16."""
    write_conversations(tmp_path / "conv.jsonl", 48)
    base = _sets(tmp_path, "qat.scheme='int4-weight'", "qat.group_size=16")
    train_config(base, tmp_path / "single")
    layouts = {"pp2": ["parallel.pp=2"], "dp2-zero3": ["parallel.dp=2", "parallel.zero=3"]}
    run_workers(train_configs, 2, [(base + extra, tmp_path / name) for name, extra in layouts.items()], timeout=600)
    one = read_metrics(tmp_path / "single")
    for name in layouts:
        two = read_metrics(tmp_path / name)
        for a, b in zip(one, two, strict=True):
            tol = 1e-6 if a["step"] == 1 else 1e-3
            assert b["loss"] == pytest.approx(a["loss"], rel=tol, abs=tol), (name, a["step"])
