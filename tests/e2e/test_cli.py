import json
import subprocess
import sys

import pytest

from megaloom.cli import build_parser, main
from megaloom.observe.metrics import read_metrics

VERBS = [["train"], ["data", "prepare"], ["generate"], ["plot"], ["info"], ["convert"], ["eval"], ["quantize"], ["prune"]]


def corpus_args(corpus) -> list[str]:
    """Overrides matching the `tiny_corpus` fixture's settings, so the prepared corpus is reused."""
    sets = [f"data.dir={str(corpus)!r}", "data.vocab_size=512", "data.max_bytes=1000000",
            "data.bpe_train_bytes=500000", "data.val_fraction=0.2"]
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_help_of_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0
    assert "usage: megaloom " + " ".join(verb) in capsys.readouterr().out


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "megaloom", "--help"], capture_output=True, text=True, check=True)
    for verb in ["train", "data", "generate", "plot", "info"]:
        assert verb in out.stdout


def test_parser_knows_the_verbs():
    assert build_parser().parse_args(["info", "--config", "x.toml"]).config_flag == "x.toml"


def test_info_reports_formula_and_numel(capsys):
    assert main(["info", "--config", "configs/gpt-1.3b.toml"]) == 0
    text = capsys.readouterr().out
    assert "1,315,819,520  actual numel" in text
    assert "1,315,815,424  Megatron-LM paper" in text and "final LayerNorm" in text
    assert main(["info", "configs/gpt-1.3b.toml", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["actual_numel"] == report["parameters"]["formula"] == 1_315_819_520
    assert report["flops"]["per_step_training"] == pytest.approx(report["flops"]["per_step_paper_formula"])


def test_config_error_is_one_line(capsys):
    assert main(["info", "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err == "megaloom: error: unknown config key 'train.stepz'; did you mean 'train.steps'?\n"


def test_train_generate_plot(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "configs/debug.toml", "--run-dir", str(run), *corpus_args(tiny_corpus),
            "--set", "train.steps=12", "--set", "log.every=4", "--set", "train.eval_every=8",
            "--set", "train.samples=1", "--set", "train.sample_tokens=8", "--set", "log.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sample 1" in out and "done" in out
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 4, 8, 12]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib"} <= r.keys()
        assert r["mfu"] is None  # CPU: no invented peak
        assert r["tokens_per_s"] > 0 and r["mem_gib"] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [8, 12]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for name in ["config.toml", "metrics.jsonl", "loss.png", "tokenizer", "checkpoints/latest",
                 "checkpoints/step_00000012/manifest.json", "checkpoints/step_00000012/.metadata"]:
        assert (run / name).exists(), name
    assert any((run / "tb").iterdir())

    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "10", "--num-samples", "2"]) == 0
    assert capsys.readouterr().out.count("def ") >= 2
    assert main(["plot", str(run), "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_generate_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path)]) == 2
    assert "holds no valid checkpoint" in capsys.readouterr().err


def test_data_prepare_reuses_prepared_corpus(tiny_corpus, capsys):
    assert main(["data", "prepare", *corpus_args(tiny_corpus)]) == 0
    assert "train tokens" in capsys.readouterr().out


def test_data_prepare_refuses_other_settings_in_same_dir(tiny_corpus, capsys):
    args = corpus_args(tiny_corpus)
    args[args.index("data.vocab_size=512")] = "data.vocab_size=600"
    assert main(["data", "prepare", *args]) == 2
    assert "data.dir" in capsys.readouterr().err


def test_info_and_simulate_share_one_memory_model(capsys):
    """`info` reports the planner's memory of megaloom's own program at the config's layout: the figure
    `simulate --recipe megaloom` gives for the same config. Plain PyTorch's program (`--recipe eager`) comes
    within 5% of MEASURED.md's 53.6 GiB at 8 x 2048 on an H100; megaloom's differs from it only by its chunked
    head, which keeps dL/dh and dL/dW (fp32) instead of 12 bytes per logit (megaloom/model/loss.py)."""
    assert main(["info", "configs/gpt-1.3b.toml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["memory"]
    sims = {}
    for recipe in ("megaloom", "eager"):
        assert main(["simulate", "--config", "configs/gpt-1.3b.toml", "--gpus", "1", "--microbatch", "8",
                     "--recipe", recipe, "--json"]) == 0
        sims[recipe] = json.loads(capsys.readouterr().out)
    assert info["total_gib"] == pytest.approx(sims["megaloom"]["memory_per_gpu_gib"])
    assert info["activations_gib"] == pytest.approx(sims["megaloom"]["memory_activations_gib"])
    assert sims["eager"]["memory_per_gpu_gib"] == pytest.approx(53.6, rel=0.05)
    tokens, vocab, hidden = 8 * 2048, 50304, 2048
    logits, grads = 12 * tokens * vocab, 4 * (tokens + vocab) * hidden
    assert (sims["eager"]["memory_activations_gib"] - info["activations_gib"]) * 2**30 == pytest.approx(
        logits - grads, rel=1e-6)
