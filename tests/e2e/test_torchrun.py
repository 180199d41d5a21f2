"""`torchrun ... megaloom train --set parallel.tp=2` matches the single-process run of the same config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaloom.cli import main
from megaloom.observe.metrics import read_metrics

from .test_cli import corpus_args

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env(corpus_root: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_torchrun_tensor_parallel_matches_single_process(tiny_corpus, tmp_path, sp, capsys):
    common = ["configs/debug.toml", *corpus_args(tiny_corpus), "--set", "train.steps=8", "--set", "log.every=1",
              "--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "log.plot=false",
              "--set", "model.dropout=0.1"]
    assert main(["train", *common, "--run-dir", str(tmp_path / "single")]) == 0
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "-m", "megaloom", "train", *common,
           "--set", "parallel.tp=2", "--set", f"parallel.sequence_parallel={'true' if sp else 'false'}",
           "--run-dir", str(tmp_path / "tp")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(tiny_corpus), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tp groups" in out.stdout  # the resolved grid is printed at start
    single, tp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "tp")
    assert [r["step"] for r in tp] == list(range(1, 9))
    for a, b in zip(single, tp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
    assert all(r["comm_bytes"] for r in tp)
    key = "tp_all_gather" if sp else "tp_all_reduce"
    assert tp[-1]["comm_bytes"][key] > 0
    assert (tmp_path / "tp" / "checkpoints" / "latest").is_file()
    # the consolidated checkpoint loads into one process
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "tp"), "--prompt", "def ", "--max-new-tokens", "5"]) == 0


def test_tp_without_enough_processes_is_a_clear_error(capsys):
    assert main(["train", "configs/debug.toml", "--set", "parallel.tp=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "parallel.tp (2)" in err and "world size is 1" in err and "\n" not in err


def test_torchrun_interleaved_pipeline_matches_single_process(tiny_corpus, tmp_path):
    common = ["configs/debug.toml", *corpus_args(tiny_corpus), "--set", "model.layers=8", "--set", "train.micro_batch=2",
              "--set", "train.steps=4", "--set", "log.every=1", "--set", "log.progress=false",
              "--set", "log.tensorboard=false", "--set", "log.plot=false", "--set", "train.eval_every=2"]
    assert main(["train", *common, "--run-dir", str(tmp_path / "single")]) == 0
    cmd = [str(TORCHRUN), "--nproc_per_node", "4", "-m", "megaloom", "train", *common, "--set", "parallel.pp=4",
           "--set", "parallel.schedule=interleaved", "--set", "parallel.chunks=2", "--run-dir", str(tmp_path / "pp")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(tiny_corpus), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "interleaved schedule" in out.stdout
    single, pp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "pp")
    assert [r["step"] for r in pp] == [1, 2, 3, 4]
    for a, b in zip(single, pp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert (a.get("val_loss") is None) == (b.get("val_loss") is None)
        if a.get("val_loss") is not None:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_pipeline_config_errors_name_the_numbers(capsys):
    assert main(["info", "configs/debug.toml", "--set", "parallel.pp=4", "--set", "parallel.schedule=interleaved",
                 "--set", "parallel.chunks=2", "--set", "model.layers=8", "--set", "train.global_batch=24",
                 "--set", "train.micro_batch=4"]) == 2
    err = capsys.readouterr().err
    assert "microbatches (6)" in err and "parallel.pp (4)" in err
    assert main(["info", "configs/debug.toml", "--set", "parallel.pp=4", "--set", "model.layers=6"]) == 2
    err = capsys.readouterr().err
    assert "model.layers (6)" in err and "parallel.layers_per_stage = [2, 2, 1, 1]" in err
    assert main(["info", "configs/debug.toml", "--set", "parallel.pp=4", "--set", "model.layers=6",
                 "--set", "parallel.layers_per_stage=[2, 2, 1, 1]"]) == 0


def test_torchrun_ptd_p_zero1_matches_single_process(tiny_corpus, tmp_path):
    common = ["configs/debug.toml", *corpus_args(tiny_corpus), "--set", "train.steps=3", "--set", "log.every=1",
              "--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "log.plot=false",
              "--set", "train.micro_batch=2"]
    assert main(["train", *common, "--run-dir", str(tmp_path / "single")]) == 0
    cmd = [str(TORCHRUN), "--nproc_per_node", "8", "-m", "megaloom", "train", *common, "--set", "parallel.tp=2",
           "--set", "parallel.pp=2", "--set", "parallel.dp=2", "--set", "parallel.zero=1",
           "--run-dir", str(tmp_path / "ptdp")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(tiny_corpus), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dp groups" in out.stdout and "ZeRO-1" in out.stdout
    single, ptdp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ptdp")
    for a, b in zip(single, ptdp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert set(b["memory"]) == {"params_gib", "grads_gib", "optimizer_gib", "activations_gib", "peak_gib"}
        assert b["comm_bytes"]["dp_all_reduce"] > 0 and b["comm_bytes"]["tp_all_reduce"] > 0
