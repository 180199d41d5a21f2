"""`torchrun ... megaloom train --set parallel.tp=2` matches the single-process run of the same config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
    assert all(r["comm_bytes"]["tp"] > 0 and r["comm_bytes"]["pp"] == r["comm_bytes"]["dp"] == 0 for r in tp)
    key = "tp_all_gather" if sp else "tp_all_reduce"
    assert tp[-1]["comm_bytes"][key] > 0
    assert (tmp_path / "tp" / "checkpoints" / "latest").is_file()
    # the sharded checkpoint loads into one process
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


@pytest.mark.parametrize("zero", [1, 3])
def test_torchrun_ptd_p_zero_matches_single_process(tiny_corpus, tmp_path, zero):
    common = ["configs/debug.toml", *corpus_args(tiny_corpus), "--set", "train.steps=3", "--set", "log.every=1",
              "--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "log.plot=false",
              "--set", "train.micro_batch=2", "--set", "model.dropout=0.1"]  # masks follow the global micro-batch
    assert main(["train", *common, "--run-dir", str(tmp_path / "single")]) == 0
    cmd = [str(TORCHRUN), "--nproc_per_node", "8", "-m", "megaloom", "train", *common, "--set", "parallel.tp=2",
           "--set", "parallel.pp=2", "--set", "parallel.dp=2", "--set", f"parallel.zero={zero}",
           "--run-dir", str(tmp_path / "ptdp")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(tiny_corpus), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dp groups" in out.stdout and f"ZeRO-{zero}" in out.stdout
    single, ptdp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ptdp")
    for a, b in zip(single, ptdp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert set(b["memory"]) == {"params_gib", "grads_gib", "optimizer_gib", "activations_gib", "peak_gib"}
        assert b["comm_bytes"]["tp_all_reduce"] > 0 and b["comm_bytes"]["pp_send"] > 0
        # ZeRO-1 reduce-scatters its buffer and all-gathers the weights; ZeRO-3 is FSDP's gathers and scatters
        ops = {"dp_reduce_scatter", "dp_all_gather"} if zero == 1 else {"dp_fsdp_all_gather", "dp_fsdp_reduce_scatter"}
        assert ops <= set(b["comm_bytes"]) and "dp_all_reduce" not in b["comm_bytes"]
    # the sharded checkpoint, consolidated by `megaloom convert`, holds the single-process weights.
    # Tolerance: Adam's first steps move each weight by about lr·sign(g), so a 1e-8 rounding difference in
    # a near-zero gradient element can show as up to ~lr (3e-3) in that weight; 1e-4 is far below the
    # 1e-2-scale error a wrong gather or shard would make. (Parameters to 1e-5 after 10 steps are checked
    # in tests/distributed/test_data_parallel.py on a model where that holds.)
    for run in ("ptdp", "single"):
        assert main(["convert", str(tmp_path / run), str(tmp_path / f"{run}.safetensors")]) == 0
    ours = load_file(str(tmp_path / "ptdp.safetensors"))
    ref = load_file(str(tmp_path / "single.safetensors"))
    assert sorted(ours) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-4,
                                   msg=f"{name}: {(ours[name] - ref[name]).abs().max().item():.2e}")
