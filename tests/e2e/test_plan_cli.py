"""`megaloom simulate` and `megaloom plan`: help, JSON fields, one-line errors, the timeline picture."""

import json

import pytest

from megaloom.cli import main

MODEL = ["--layers", "24", "--hidden", "2048", "--heads", "16", "--vocab", "50304", "--seq", "2048"]
FIELDS = {"step_time_s", "tokens_per_s", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu", "hfu",
          "bubble_fraction", "memory_per_gpu_gib", "fits"}
LAYOUT = {"tp", "pp", "dp", "microbatch", "chunks", "recompute", "zero", "sequence_parallel"}


@pytest.mark.parametrize("verb", ["simulate", "plan"])
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert f"usage: megaloom {verb}" in capsys.readouterr().out


def test_simulate_json_and_timeline(tmp_path, capsys):
    png = tmp_path / "t.png"
    assert main(["simulate", *MODEL, "--cluster", "dgx-a100", "--gpus", "16", "--tp", "2", "--pp", "4",
                 "--global-batch", "64", "--microbatch", "2", "--chunks", "2", "--recompute", "selective",
                 "--zero", "1", "--sequence-parallel", "--json", "--timeline", str(png)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert FIELDS | LAYOUT <= set(r)
    assert (r["tp"], r["pp"], r["dp"], r["chunks"], r["schedule"]) == (2, 4, 2, 2, "interleaved")
    assert png.stat().st_size > 10_000


def test_simulate_text_from_a_config(capsys):
    assert main(["simulate", "--config", "configs/gpt-1.3b.toml", "--gpus", "8", "--microbatch", "8"]) == 0
    out = capsys.readouterr().out
    assert "s/step" in out and "GiB model state" in out


def test_simulate_of_a_config_models_the_files_layout_as_info_does(capsys):
    """Without layout flags `simulate --config` models the file's layout (train.micro_batch 8 of gpt-1.3b.toml,
    its recomputation, parallel.*): with megaloom's program its memory is exactly `info`'s; a layout flag beside
    the file overrides its value."""
    assert main(["info", "configs/gpt-1.3b.toml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["memory"]
    assert main(["simulate", "--config", "configs/gpt-1.3b.toml", "--gpus", "1", "--recipe", "megaloom", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["microbatch"], r["recompute"], r["tp"], r["pp"], r["zero"]) == (8, info["recompute"], 1, 1, 0)
    assert r["memory_per_gpu_gib"] == pytest.approx(info["total_gib"], rel=1e-9)
    assert main(["simulate", "--config", "configs/gpt-1.3b.toml", "--gpus", "2", "--recipe", "megaloom", "--microbatch",
                 "2", "--recompute", "full", "--zero", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["microbatch"], r["recompute"], r["zero"], r["dp"]) == (2, "full", 1, 2)
    assert main(["info", "configs/gpt-1.3b.toml", "--set", "train.recompute=full", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["recompute"] == "full"  # the file's, without the flag


def test_plan_json(capsys):
    assert main(["plan", *MODEL, "--cluster", "dgx-h100", "--gpus", "16", "--global-batch", "256",
                 "--tp", "2", "--top", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(FIELDS | LAYOUT <= set(r) for r in rows)
    assert all(r["tp"] == 2 and r["fits"] for r in rows)
    assert rows[0]["step_time_s"] <= rows[1]["step_time_s"] <= rows[2]["step_time_s"]


def test_plan_text_explains(capsys):
    assert main(["plan", *MODEL, "--gpus", "8", "--global-batch", "64", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "#2 differs in" in out and "slower" in out
    step = next(line for line in out.splitlines() if line.strip().startswith("its step:"))
    for part in ("compute", "tp collectives", "exposed pp p2p", "bubble", "exposed ZeRO gathers",
                 "exposed dp reduction", "optimizer"):
        assert part in step, part


def test_breakdown_adds_up_to_the_step(capsys):
    """compute + tp + exposed ZeRO gathers + exposed p2p + bubble + exposed dp + optimizer + the
    tied embedding's sum and the scalars = the step."""
    assert main(["simulate", *MODEL, "--gpus", "16", "--tp", "2", "--pp", "4", "--global-batch", "64",
                 "--chunks", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["time_breakdown_s"]["pp_p2p_exposed"] > 0 and r["time_breakdown_s"]["pipeline_bubble"] > 0
    assert sum(r["time_breakdown_s"].values()) == pytest.approx(r["step_time_s"], rel=1e-9)


@pytest.mark.parametrize("args,match", [
    (["simulate", *MODEL, "--gpus", "12", "--tp", "8", "--global-batch", "64"], "--gpus (12) must be a multiple of --tp"),
    (["simulate", *MODEL, "--gpus", "6", "--tp", "3", "--global-batch", "64"], "--tp (3) must divide --heads (16)"),
    (["simulate", *MODEL, "--gpus", "8", "--cluster", "nowhere", "--global-batch", "8"], "--cluster 'nowhere'"),
    (["simulate", "--layers", "2", "--gpus", "8", "--global-batch", "8"], "the model needs --hidden"),
    (["plan", *MODEL, "--gpus", "8"], "--global-batch is required"),
])
def test_errors_are_one_line(args, match, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("megaloom: error: ") and match in err and err.count("\n") == 1


def test_flags_beside_config_override_the_file(capsys):
    """configs/debug.toml has 2 layers: --layers 4 beside it makes --pp 2 --chunks 2 valid (1 layer each)."""
    assert main(["simulate", "--config", "configs/debug.toml", "--layers", "4", "--hidden", "128", "--gpus", "2",
                 "--pp", "2", "--chunks", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["pp"], r["chunks"], r["schedule"]) == (2, 2, "interleaved")
    assert len(r["comm_bytes_per_stage"]) == 2 and all(set(s) == {"tp", "pp", "dp"} for s in r["comm_bytes_per_stage"])
    assert r["comm_bytes_per_gpu"]["pp"] == max(s["pp"] for s in r["comm_bytes_per_stage"])
    # fp32 (the file's train.precision) sends 4-byte activations, --precision bf16 two
    assert main(["simulate", "--config", "configs/debug.toml", "--layers", "4", "--gpus", "2", "--pp", "2",
                 "--json", "--precision", "bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)["comm_bytes_per_stage"][0]["pp"]
    assert main(["simulate", "--config", "configs/debug.toml", "--layers", "4", "--gpus", "2", "--pp", "2",
                 "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)["comm_bytes_per_stage"][0]["pp"]
    assert fp32 - 4 - 512 * 64 * 4 == pytest.approx(2 * (bf16 - 4 - 512 * 64 * 4))  # sends, beside embedding and norm
