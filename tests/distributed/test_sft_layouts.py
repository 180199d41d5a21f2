"""Supervised fine-tuning (train.objective = "sft": the loss on assistant tokens only, conversations padded
or packed) in every kind of layout equals the single-process run: the trainer's losses, gradient norms and
validation losses to 1e-5 at tp = 2 with sequence parallelism (packed, GPT-2's learned positions sliced per
rank), pp = 2 (packed: the document ids reach both stages; GPT-2's tied embedding on both), and tp = 2 (padded
Llama, the masked vocab-parallel loss) started from the single run's step-2 checkpoint. One launch of two
processes. (The data-parallel slices of the SFT loader equal the single batch: tests/unit/test_sft_data.py.)"""

import pytest
import torch.distributed as dist

from megaloom.config import load_config
from megaloom.data.corpus import ensure_corpus_for
from megaloom.observe.metrics import read_metrics
from megaloom.observe.progress import Console
from megaloom.parallel.launch import LaunchEnv, start
from megaloom.train.trainer import Trainer

from ..unit.test_sft_data import write_conversations
from .launch import run_workers


def _sets(tmp, family, packing, *extra):
    return [f"model.family='{family}'", "model.layers=2", "model.hidden=32", "model.heads=4", "model.vocab_size=320",
            "model.seq_len=64", "train.objective='sft'", f"data.sources=['{tmp / 'conv.jsonl'}']",
            f"data.dir='{tmp / 'corpus'}'", "data.vocab_size=300", "data.val_fraction=0.2",
            f"data.packing={'true' if packing else 'false'}", "train.global_batch=4", "train.micro_batch=2",
            "train.steps=4", "train.eval_every=2", "train.eval_batches=2", "train.warmup=1", "checkpoint.every=2",
            "log.every=1", "log.progress=false", "log.tensorboard=false", "log.plot=false", *extra]


def _train(sets, run_dir, rank=0, world=1):
    cfg = load_config("configs/debug.toml", sets)
    grid, device = start(cfg, LaunchEnv(rank, world))
    if rank == 0:  # one process prepares the corpus, the others then find it ready (as `megaloom train`)
        ensure_corpus_for(cfg, run_dir.parent / "cache")
    if world > 1:
        dist.barrier()
    corpus = ensure_corpus_for(cfg, run_dir.parent / "cache")
    Trainer(cfg, run_dir, corpus, Console(quiet=True), grid, device).run()


def _worker(rank, world, runs):
    for sets, run_dir in runs:
        _train(sets, run_dir, rank, world)


def test_sft_layouts_equal_one_process(tmp_path):
    write_conversations(tmp_path / "conv.jsonl", 48)
    refs = {}
    for family, packing in (("gpt2", True), ("llama", False)):
        refs[family, packing] = tmp_path / f"single-{family}-{packing}"
        _train(_sets(tmp_path, family, packing), refs[family, packing])
    ckpt = refs["llama", False] / "checkpoints" / "step_00000002"
    layouts = [("gpt2", True, "tp2-sp", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
               ("gpt2", True, "pp2", ["parallel.pp=2"]),
               ("llama", False, "tp2-resumed", ["parallel.tp=2", f"checkpoint.load='{ckpt}'",
                                                 f"data.dir='{tmp_path / 'corpus-resumed'}'"])]
    runs = [(_sets(tmp_path, family, packing, *extra), tmp_path / name) for family, packing, name, extra in layouts]
    run_workers(_worker, 2, runs, timeout=240)
    for (family, packing, name, _), (_, run_dir) in zip(layouts, runs):
        single, ours = read_metrics(refs[family, packing]), read_metrics(run_dir)
        assert [r["step"] for r in ours] == ([3, 4] if "resumed" in name else [1, 2, 3, 4]), name
        for a, b in zip(single[-len(ours):], ours):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), (name, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-6), (name, a["step"])
            assert ("val_loss" in b) == ("val_loss" in a)
            if "val_loss" in a:
                assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5, abs=1e-5), (name, a["step"])
