"""`megaloom train` with train.objective = "sft": conversations prepared on first use, packed, validated,
checkpointed; a run started from its step-2 checkpoint continues exactly as the run that went on."""

import pytest

from megaloom.cli import main
from megaloom.observe.metrics import read_metrics

from ..unit.test_sft_data import write_conversations


def _args(tmp_path, steps=4, *extra):
    src = write_conversations(tmp_path / "conv.jsonl", 48)
    sets = ["train.objective='sft'", f"data.sources=['{src}']", f"data.dir='{tmp_path / 'corpus'}'",
            "data.vocab_size=300", "model.vocab_size=320", "data.val_fraction=0.2", "model.seq_len=64",
            "train.global_batch=4", "train.micro_batch=2", f"train.steps={steps}", "train.eval_every=2",
            "train.eval_batches=2", "checkpoint.every=2", "log.every=1", "log.progress=false",
            "log.tensorboard=false", "log.plot=false", *extra]
    return ["configs/debug.toml", *[a for s in sets for a in ("--set", s)]]


def test_sft_run_validates_checkpoints_and_resumes(tmp_path, capsys):
    """Packed; the padded path runs from a checkpoint in tests/distributed/test_sft_layouts.py."""
    args = _args(tmp_path, 4, "data.packing=true")
    assert main(["train", *args, "--run-dir", str(tmp_path / "a")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines where the paths make it
    assert "loss on assistant tokens" in out and "packed" in out
    rows = read_metrics(tmp_path / "a")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [("val_loss" in r) for r in rows] == [False, True, False, True]
    assert all(0 < r["loss"] < 10 for r in rows)
    # the run's tokenizer keeps the chat template it was trained with (generation applies it)
    assert (tmp_path / "a" / "tokenizer" / "chat_template.jinja").is_file()
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
    # fine-tuning a checkpoint tokenizes with its run's tokenizer: a corpus of its own (here the same tokens)
    more = ["--set", f"checkpoint.load='{ckpt}'", "--set", f"data.dir='{tmp_path / 'corpus-b'}'"]
    assert main(["train", *args, *more, "--run-dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "corpus-b" / "train.bin").read_bytes() == (tmp_path / "corpus" / "train.bin").read_bytes()
    resumed = read_metrics(tmp_path / "b")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(rows[2:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b.get("val_loss", 0) == pytest.approx(a.get("val_loss", 0), rel=1e-6)


def test_data_prepare_and_config_errors(tmp_path, capsys):
    assert main(["data", "prepare", *_args(tmp_path)]) == 0
    assert "validation tokens" in capsys.readouterr().out
    assert main(["train", "configs/debug.toml", "--set", "train.objective='sft'"]) == 2
    err = capsys.readouterr().err
    assert "data.sources has \"stdlib\"" in err and err.count("\n") == 1
    assert main(["train", "configs/debug.toml", "--set", "data.packing=true"]) == 2
    assert "supervised fine-tuning only" in capsys.readouterr().err
