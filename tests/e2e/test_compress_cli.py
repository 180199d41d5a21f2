"""`megaloom quantize` and `megaloom prune` on a tiny Llama: the quantized checkpoint gives the logits of
transformers' own model quantized by torchao's quantize_ with the same config (q/k/v and gate/up
separate there, fused here: per-row and per-group scales make that the same), and megaloom eval and
generate load it; a pruned checkpoint exports to Hugging Face with its zeros and N:M pattern, and
train.keep_sparsity keeps the zeros through training (without it they fill in)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from megaloom.cli import main
from tests.tiny_pretrained import TEXT, VOCAB, make

warnings.filterwarnings("ignore", message=".*register_constant.*")
TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    (root / "calib.txt").write_text("".join(TEXT), encoding="utf-8")
    return make("llama-gqa", root / "hf"), root / "calib.txt"


def _transformers_quantized_logits(hf, method: str, group):  # noqa: ANN001
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    from megaloom.compress.schemes import QuantScheme

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    quantize_(model.model.layers, QuantScheme.parse(method, group).torchao_config())  # every linear of the blocks
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("method, group", [pytest.param("int8-dynamic", None, marks=pytest.mark.slow),
                                           ("int4-weight", 16)])
def test_quantize_equals_torchao_on_transformers_and_loads_everywhere(tiny, tmp_path, method, group, capsys):
    from megaloom.compress.store import load_quantized

    hf, calib = tiny
    out = tmp_path / method
    flags = ["--group-size", str(group)] if group else []
    assert main(["quantize", str(hf), str(out), "--method", method, *flags]) == 0
    said = capsys.readouterr().out
    assert "16 linears quantized" in said and "MB on disk" in said and "embed.tok.weight" in said
    model, _, _ = load_quantized(out)
    with torch.no_grad():
        ours = model(TOKENS)
    # weight-only: the same dequantised weights, float rounding apart. int8-dynamic also rounds each token's
    # activations to int8, where megaloom's and transformers' RMSNorm, a float rounding apart, can flip one
    # step of the activation scale: a change of ~1e-3 in the logits, far below a wrong scale or layout
    atol = 1e-2 if method == "int8-dynamic" else 1e-4
    torch.testing.assert_close(ours, _transformers_quantized_logits(hf, method, group), rtol=0, atol=atol)
    assert main(["eval", str(out), "--task", "perplexity", "--data", str(calib), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_perplexity"] > 1
    assert main(["generate", str(out), "--prompt", "def", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert main(["convert", str(out), str(tmp_path / "hf-out"), "--to", "hf"]) == 2  # no silent half export
    assert "is a quantized checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_gptq_checkpoint_evaluates_close_to_the_model(tiny, tmp_path, capsys):
    hf, calib = tiny
    out = tmp_path / "gptq"
    assert main(["quantize", str(hf), str(out), "--method", "gptq", "--group-size", "16", "--calib", str(calib),
                 "--calib-samples", "8", "--calib-length", "48"]) == 0
    capsys.readouterr()
    ppl = {}
    for name, path in (("fp32", hf), ("gptq", out)):
        assert main(["eval", str(path), "--task", "perplexity", "--data", str(calib), "--json"]) == 0
        ppl[name] = json.loads(capsys.readouterr().out)["token_perplexity"]
    assert abs(ppl["gptq"] / ppl["fp32"] - 1) < 0.05, ppl
    assert main(["quantize", str(hf), str(tmp_path / "x"), "--method", "gptq"]) == 2  # no --calib: one line
    assert "needs calibration text" in capsys.readouterr().err


def test_prune_export_and_keep_sparsity(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    from megaloom.train.checkpoint import full_tensors, latest_checkpoint

    hf, calib = tiny
    pruned = tmp_path / "pruned"
    assert main(["prune", str(hf), str(pruned), "--method", "wanda", "--pattern", "2:4", "--calib", str(calib),
                 "--calib-samples", "8", "--calib-length", "48"]) == 0
    assert "50.0% of their weights are zero" in capsys.readouterr().out
    masks = full_tensors(pruned, "mask/")
    assert len(masks) == 16
    exported = tmp_path / "hf-pruned"
    assert main(["convert", str(pruned), str(exported), "--to", "hf"]) == 0
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    down = theirs.model.layers[1].mlp.down_proj.weight.detach()
    assert torch.equal(down == 0, ~masks["layers.1.mlp.down.weight"])
    assert torch.equal((down == 0).reshape(down.shape[0], -1, 4).sum(-1), torch.full((down.shape[0], down.shape[1] // 4), 2))
    assert load_file(exported / "model.safetensors").keys() == load_file(hf / "model.safetensors").keys()

    def train(keep: bool):  # a large learning rate: without the masks every zero moves
        run = tmp_path / f"run-{keep}"
        sets = [f"model.pretrained={str(hf)!r}", f"checkpoint.load={str(pruned)!r}",
                f"train.keep_sparsity={str(keep).lower()}", "model.seq_len=32", "train.steps=2", "train.global_batch=2",
                "train.micro_batch=2", "train.lr=1e-2",
                "train.warmup=0", "train.eval_batches=1", "data.max_bytes=60000", "data.val_fraction=0.3",
                f"data.dir={str(tmp_path / 'corpus')!r}", "log.progress=false", "log.tensorboard=false", "log.plot=false"]
        assert main(["train", "--run-dir", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
        return full_tensors(latest_checkpoint(run), "model/"), full_tensors(latest_checkpoint(run), "mask/")

    kept, saved_masks = train(True)
    assert "16 weight matrices kept sparse (masks of" in capsys.readouterr().out
    moved, _ = train(False)
    for name, mask in masks.items():
        assert torch.equal(kept[name][~mask], torch.zeros(int((~mask).sum()))), name
        assert torch.equal(saved_masks[name], mask), name  # the run's checkpoint carries the masks on
    assert all(bool((moved[name][~mask] != 0).all()) for name, mask in masks.items())
