"""Quantization-aware training from the command line on a tiny pretrained Llama: `megaloom train` with
[qat] (int8 activations per token, int4 weights in groups of 16), then `megaloom quantize RUN OUT
--from-qat`, then `megaloom eval OUT` and `megaloom generate OUT`. The converted model's logits are the
fake-quantized forward's (the run's weights, fake-quantized as in training), and the misuses of
--from-qat and --method stop with one line."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from megaloom.cli import main
from tests.tiny_pretrained import TEXT, make

warnings.filterwarnings("ignore", message=".*register_constant.*")


def _train(hf, tmp_path, run, *extra):
    sets = [f"model.pretrained={str(hf)!r}", "model.seq_len=32", "train.steps=2", "train.global_batch=2",
            "train.micro_batch=2", "train.lr=1e-2", "train.warmup=0", "train.eval_batches=1", "data.max_bytes=60000",
            "data.val_fraction=0.3", f"data.dir={str(tmp_path / 'corpus')!r}", "log.progress=false",
            "log.tensorboard=false", "log.plot=false", *extra]
    return main(["train", "--run-dir", str(run), *[a for s in sets for a in ("--set", s)]])


@pytest.mark.slow
def test_train_quantize_from_qat_eval_generate(tmp_path, capsys):
    from megaloom.compress.qat import prepare, qat_scheme
    from megaloom.compress.store import load_quantized
    from megaloom.interop.load import load_model

    hf = make("llama-gqa", tmp_path / "hf")
    text = tmp_path / "held.txt"
    text.write_text("".join(TEXT[:6]), encoding="utf-8")
    run, out = tmp_path / "run", tmp_path / "q"
    assert _train(hf, tmp_path, run, "qat.scheme='int8-dynamic-act-int4-weight'", "qat.group_size=16") == 0
    assert main(["quantize", str(run), str(out), "--from-qat"]) == 0
    said = capsys.readouterr().out
    assert "16 linears quantized (int8-dynamic-act-int4-weight, group size 16)" in said

    tokens = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    model, _, cfg = load_model(run)  # the run's weights, fake-quantized as its training forward was
    prepare(model, qat_scheme(cfg), None)
    quantized, _, _ = load_quantized(out)
    with torch.no_grad():
        torch.testing.assert_close(quantized(tokens), model(tokens), rtol=0, atol=1e-5)

    assert main(["eval", str(out), "--task", "perplexity", "--data", str(text), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "perplexity" and result["token_perplexity"] > 1
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_from_qat_misuse_is_one_line(tmp_path, capsys):
    hf = make("llama-gqa", tmp_path / "hf")
    run = tmp_path / "plain"
    assert _train(hf, tmp_path, run, "train.steps=1") == 0
    capsys.readouterr()
    assert main(["quantize", str(run), str(tmp_path / "q"), "--from-qat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not trained with quantization-aware training" in err and "\n" not in err
    assert main(["quantize", str(run), str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--method is required" in err and "\n" not in err
