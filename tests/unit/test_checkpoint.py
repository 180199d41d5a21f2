"""Checkpoint pieces, manifests, corruption, crashes during save, numerical faults, convert (one process)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megaloom.cli import main
from megaloom.observe.metrics import read_metrics
from megaloom.parallel.shard import ShardSpec
from megaloom.train import checkpoint as ck
from megaloom.train.sharded_state import flat_range_boxes, spec_pieces

from ..e2e.test_cli import corpus_args

QUIET = ["--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "log.plot=false",
         "--set", "log.every=1"]


def _train(corpus, run, *sets: str) -> int:
    args = ["train", "configs/debug.toml", "--run-dir", str(run), *corpus_args(corpus), *QUIET]
    for s in sets:
        args += ["--set", s]
    return main(args)


# ------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("blocks,dim,size", [((12,), 0, 2), ((8, 4, 4), 0, 2), ((6,), 1, 2), ((4, 8), 0, 2),
                                             ((11,), 0, 2), ((11,), 0, 3), ((7,), 1, 4)])
def test_tensor_parallel_pieces_place_every_element(blocks, dim, size):
    """Each rank's pieces, put at their offsets, rebuild the full tensor exactly once; where `size` does
    not divide a block (a vocabulary), the last shard's zero padding is in no piece."""
    shape = (sum(blocks), 6) if dim == 0 else (5, sum(blocks))
    full = torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape)
    rebuilt, covered = torch.zeros(shape), torch.zeros(shape)
    for rank in range(size):
        spec = ShardSpec(shape, dim, blocks, rank, size)
        shard = spec.take(full)
        assert tuple(shard.shape) == spec.local_shape and torch.equal(spec.assemble([s.take(full) for s in (
            ShardSpec(shape, dim, blocks, r, size) for r in range(size))]), full)
        for piece in spec_pieces(shard, (0, 0), spec):
            idx = tuple(slice(o, o + n) for o, n in zip(piece.offsets, piece.view.shape))
            rebuilt[idx] = piece.view
            covered[idx] += 1
    assert torch.equal(rebuilt, full) and torch.all(covered == 1)


def test_a_view_inside_a_shard_maps_to_its_block():
    spec = ShardSpec((12, 3), 0, (4, 4, 4), rank=1, size=2)  # rank 1 holds rows 2-3, 6-7, 10-11
    shard = torch.zeros(6, 3)
    pieces = spec_pieces(shard[1:4], (1, 0), spec)  # shard rows 1..3 = full rows 3, 6, 7
    assert [(p.offsets, tuple(p.view.shape)) for p in pieces] == [((3, 0), (1, 3)), ((6, 0), (2, 3))]


def test_flat_ranges_become_rectangles():
    assert flat_range_boxes((4, 5), 3, 17) == [(3, (0, 3), (1, 2)), (5, (1, 0), (2, 5)), (15, (3, 0), (1, 2))]
    assert flat_range_boxes((4, 5), 5, 15) == [(5, (1, 0), (2, 5))]
    assert flat_range_boxes((4, 5), 6, 8) == [(6, (1, 1), (1, 2))]
    assert flat_range_boxes((7,), 2, 5) == [(2, (2,), (3,))]
    total = sum(s[0] * s[1] for _, _, s in flat_range_boxes((9, 7), 4, 50))
    assert total == 46


# ------------------------------------------------------------------------ saving, verifying, resuming


def test_checkpoints_are_verified_and_the_newest_valid_one_is_chosen(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_corpus, run, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=3") == 0
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]
    assert (root / "latest").read_text().strip() == "step_00000006"
    manifest = json.loads((root / "step_00000006" / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["layout"]["tp"] == 1
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "config.toml"}
    assert ck.find_checkpoint(run) == root / "step_00000006"

    # a bit flip in the newest is caught by its checksum; a truncated file by its size
    data = root / "step_00000006" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    reports: list[str] = []
    assert ck.find_checkpoint(run, report=reports.append) == root / "step_00000004"
    assert len(reports) == 1 and "SHA-256" in reports[0] and "\n" not in reports[0]
    with open(root / "step_00000004" / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)
    reports.clear()
    assert ck.find_checkpoint(run, report=reports.append) == root / "step_00000002"
    assert "truncated" in reports[1]

    # a directory without its manifest (an interrupted save) is never chosen
    (root / "step_00000002" / "manifest.json").unlink()
    assert ck.find_checkpoint(run) is None

    # a fresh start in the same directory then: metrics.jsonl restarts from step 1
    capsys.readouterr()
    assert _train(tiny_corpus, run, "train.steps=2", "checkpoint.every=0") == 0
    assert "not usable" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_crash_during_save_keeps_the_previous_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert _train(tiny_corpus, run, "train.steps=2") == 0
    good = ck.find_checkpoint(run)

    real_save = ck.dcp.save

    def partial_save(state, storage_writer, **kwargs):  # every file written, then the process dies
        real_save(state, storage_writer=storage_writer, **kwargs)
        raise OSError("killed while saving")

    monkeypatch.setattr(ck.dcp, "save", partial_save)
    with pytest.raises(OSError, match="killed while saving"):
        _train(tiny_corpus, run, "train.steps=4")
    monkeypatch.undo()
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == good.name
    assert ck.find_checkpoint(run) == good
    assert [p.name for p in root.glob(".tmp-*")] == [".tmp-step_00000004"]
    # the next run resumes from the good one and clears the leftover
    assert _train(tiny_corpus, run, "train.steps=4") == 0
    assert not list(root.glob(".tmp-*")) and ck.find_checkpoint(run).name == "step_00000004"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "megaloom", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_killed_run_resumes_to_the_same_result(tiny_corpus, tmp_path):
    common = ["train", "configs/debug.toml", *corpus_args(tiny_corpus), *QUIET, "--set", "train.steps=8",
              "--set", "checkpoint.every=3", "--set", "model.dropout=0.1"]
    assert _cli(*common, "--run-dir", str(tmp_path / "whole")).returncode == 0
    kill = [*common, "--run-dir", str(tmp_path / "killed"), "--set", "faults.kill_rank=0", "--set", "faults.at_step=5"]
    first = _cli(*kill)
    assert first.returncode == -9  # SIGKILL in the middle of step 5
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4]
    second = _cli(*kill)  # the same command again: resumes from step 3, the fault has fired already
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed" in second.stdout and "step 3" in second.stdout
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    assert resumed[-1]["val_loss"] == whole[-1]["val_loss"]
    a, b = ck.full_tensors(ck.find_checkpoint(tmp_path / "whole")), ck.full_tensors(ck.find_checkpoint(tmp_path / "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise


def test_nonfinite_steps_are_skipped_and_counted(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    assert _train(tiny_corpus, run, "train.steps=6", "faults.at_step=3", "faults.nonfinite_steps=2") == 0
    rows = read_metrics(run)
    assert [r["skipped"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert rows[2]["grad_norm"] is None and rows[4]["grad_norm"] is not None
    assert all(r["loss"] == r["loss"] for r in rows)  # the losses stay finite: the weights never took the step


def test_too_many_consecutive_skips_stop_with_the_checkpoint_before_the_fault(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    code = _train(tiny_corpus, run, "train.steps=10", "checkpoint.every=2", "faults.at_step=4",
                  "faults.nonfinite_steps=5", "train.max_consecutive_skips=3")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "steps 4-6 had non-finite" in err and "step_00000002" in err
    assert ck.find_checkpoint(run).name == "step_00000002"


def test_async_save_writes_the_same_checkpoint(tiny_corpus, tmp_path):
    assert _train(tiny_corpus, tmp_path / "sync", "train.steps=4", "checkpoint.every=2") == 0
    assert _train(tiny_corpus, tmp_path / "async", "train.steps=4", "checkpoint.every=2", "checkpoint.async=true") == 0
    for step in ("step_00000002", "step_00000004"):
        a = ck.full_tensors(tmp_path / "sync" / "checkpoints" / step)
        b = ck.full_tensors(tmp_path / "async" / "checkpoints" / step)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert ck.verify(tmp_path / "async" / "checkpoints" / step) is None


def test_convert_round_trip_and_load_into_a_new_run(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_corpus, run, "train.steps=3") == 0
    out = tmp_path / "model.safetensors"
    assert main(["convert", str(run), str(out)]) == 0
    weights = load_file(str(out))
    assert "embed.tok.weight" in weights and "layers.1.mlp.down.weight" in weights
    back = tmp_path / "imported"
    assert main(["convert", str(out), str(back), "--config", str(run / "config.toml")]) == 0
    assert ck.verify(back) is None
    again = ck.full_tensors(back)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    # a weights-only checkpoint starts a new run at step 0 from those weights
    capsys.readouterr()
    assert _train(tiny_corpus, tmp_path / "new", "train.steps=1", f"checkpoint.load={str(back)!r}") == 0
    assert "loaded the weights" in capsys.readouterr().out
    first_loss = read_metrics(tmp_path / "new")[0]["loss"]
    assert first_loss < read_metrics(run)[0]["loss"]  # it starts from the trained weights, not from scratch


def test_bad_checkpoint_inputs_are_one_line_errors(tiny_corpus, tmp_path, capsys):
    assert _train(tiny_corpus, tmp_path / "a", "checkpoint.load='/nonexistent/dir'") == 2
    err = capsys.readouterr().err
    assert "checkpoint.load = '/nonexistent/dir' does not exist" in err and err.count("\n") == 1
    assert _train(tiny_corpus, tmp_path / "small", "train.steps=1") == 0
    capsys.readouterr()
    assert _train(tiny_corpus, tmp_path / "b", "model.layers=3", f"checkpoint.load={str(tmp_path / 'small')!r}") == 2
    err = capsys.readouterr().err
    assert "holds a different model" in err and "layers.2" in err and err.count("\n") == 1
    assert main(["convert", str(tmp_path / "small"), str(tmp_path / "x.bin")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_fault_keys_are_validated(capsys):
    assert main(["info", "--set", "faults.kill_rank=3"]) == 2
    assert "faults.kill_rank = 3 is not a rank of this run (0..0)" in capsys.readouterr().err
    assert main(["info", "--set", "faults.nonfinite_steps=2"]) == 2
    assert "needs faults.at_step" in capsys.readouterr().err


def test_rerunning_a_finished_run_changes_nothing(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_corpus, run, "train.steps=2") == 0
    ckpt = ck.find_checkpoint(run)
    stamp = (ckpt / "manifest.json").stat().st_mtime_ns
    rows = read_metrics(run)
    capsys.readouterr()
    assert _train(tiny_corpus, run, "train.steps=2") == 0
    out = capsys.readouterr().out
    assert "run already complete at step 2" in out and str(ckpt) in out
    assert (ckpt / "manifest.json").stat().st_mtime_ns == stamp  # not saved again
    assert read_metrics(run) == rows
