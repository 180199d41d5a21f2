"""Multi-process fault tolerance: a killed rank brings the job back under torchrun --max-restarts,
checkpoints load into other layouts, a hung peer is named instead of hanging the job."""

import subprocess

import pytest
import torch

from megaloom.observe.metrics import read_metrics
from megaloom.train import checkpoint as ck

from .test_cli import corpus_args
from .test_torchrun import TORCHRUN, _env

QUIET = ["--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "log.plot=false",
         "--set", "log.every=1"]
MODEL = ["--set", "model.layers=4", "--set", "train.micro_batch=1"]  # 4 layers split over up to 4 stages


def _layout(t: int, p: int, d: int, zero: int = 0) -> list[str]:
    return ["--set", f"parallel.tp={t}", "--set", f"parallel.pp={p}", "--set", f"parallel.dp={d}",
            "--set", f"parallel.zero={zero}"]


def _torchrun(corpus, n: int, *args: str, restarts: int = 0) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--nproc_per_node", str(n), "--max-restarts", str(restarts), "-m", "megaloom", "train",
           "configs/debug.toml", *corpus_args(corpus), *QUIET, *MODEL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(corpus), timeout=600)


def test_killed_rank_restarts_under_torchrun_and_ends_bitwise_equal(tiny_corpus, tmp_path):
    common = ["--set", "train.steps=10", "--set", "checkpoint.every=5", *_layout(2, 2, 1)]
    whole = _torchrun(tiny_corpus, 4, *common, "--run-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _torchrun(tiny_corpus, 4, *common, "--run-dir", str(tmp_path / "killed"), "--set", "faults.kill_rank=3",
                       "--set", "faults.at_step=7", restarts=1)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "resumed" in killed.stdout and "at step 5" in killed.stdout  # torchrun restarted every rank
    assert (tmp_path / "killed" / "faults" / "kill-rank3-step7").exists()
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    wa, wb = (ck.full_tensors(ck.find_checkpoint(tmp_path / r)) for r in ("whole", "killed"))
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_saved_at_2_2_2_continues_in_other_layouts(tiny_corpus, tmp_path):
    """Saved at (t, p, d) = (2, 2, 2) with ZeRO-1, loaded at (1, 4, 2) with ZeRO-2, (4, 1, 2) and (1, 1, 1):
    the next 5 steps have the losses of the run that never stopped, dropout included."""
    common = ["--set", "train.steps=8", "--set", "checkpoint.every=3", "--set", "checkpoint.keep=5",
              "--set", "model.dropout=0.1"]  # dropout masks follow the global micro-batch, not the layout
    ref = _torchrun(tiny_corpus, 8, *common, *_layout(2, 2, 2, zero=1), "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref")}
    source = tmp_path / "ref" / "checkpoints" / "step_00000003"
    for name, n, layout in [("1-4-2", 8, _layout(1, 4, 2, zero=2)), ("4-1-2", 8, _layout(4, 1, 2)),
                            ("1-1-1", 1, _layout(1, 1, 1))]:
        out = _torchrun(tiny_corpus, n, *common, *layout, "--set", f"checkpoint.load={str(source)!r}",
                        "--run-dir", str(tmp_path / name))
        assert out.returncode == 0, (name, out.stderr[-3000:])
        assert "resharded" in out.stdout
        rows = read_metrics(tmp_path / name)
        assert [r["step"] for r in rows] == [4, 5, 6, 7, 8]
        for r in rows:
            assert r["loss"] == pytest.approx(expected[r["step"]], rel=1e-5, abs=1e-5), (name, r["step"])


def test_hung_peer_is_named_instead_of_hanging(tiny_corpus, tmp_path):
    out = _torchrun(tiny_corpus, 2, "--set", "train.steps=6", *_layout(1, 1, 2), "--set", "faults.hang_rank=1",
                    "--set", "faults.at_step=3", "--set", "parallel.timeout_s=5", "--run-dir", str(tmp_path / "run"))
    assert out.returncode != 0
    line = next(x for x in out.stderr.splitlines() if x.startswith("megaloom: error:"))
    assert "rank 0 (tp_rank=0, dp_rank=0, pp_rank=0) failed in" in line
    assert "Timed out" in line and "rank(s) [1] did not respond" in line


def test_llama_interleaved_checkpoint_loads_on_one_process(tiny_corpus, tmp_path):
    """Grouped-query QKV (blocks of unequal size) and gate/up shards, interleaved chunks: to (1, 1, 1)."""
    common = ["--set", "model.family=\"llama\"", "--set", "model.kv_heads=2", "--set", "train.steps=5",
              "--set", "checkpoint.every=3", "--set", "checkpoint.keep=3"]
    ref = _torchrun(tiny_corpus, 4, *common, *_layout(2, 2, 1), "--set", "parallel.chunks=2",
                    "--set", "parallel.schedule=\"interleaved\"", "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    source = tmp_path / "ref" / "checkpoints" / "step_00000003"
    one = _torchrun(tiny_corpus, 1, *common, "--set", f"checkpoint.load={str(source)!r}", "--run-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref")}
    rows = read_metrics(tmp_path / "one")
    assert [r["step"] for r in rows] == [4, 5]
    for r in rows:
        assert r["loss"] == pytest.approx(expected[r["step"]], rel=1e-5, abs=1e-5)
