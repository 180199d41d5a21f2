"""train.objective = "distill" on the parallel engine, each layout in one launch of two processes:

- the loss with the vocabulary split over 2 real tp ranks (13 rows: 7 and 6 plus a padding row) equals TRL's
  `generalized_jsd_loss` (+ the cross entropy) on the full logits, values and gradients to 1e-6 (fp64, chunks
  smaller than the token count);
- the trainer's losses, gradient norms, distillation metrics and validation loss at tp = 2 with sequence
  parallelism and (marked slow) at pp = 2 and at dp = 2 with ZeRO-3 equal the single-process run to 1e-5:
  a 4-layer tiny teacher (a Hugging Face directory) and a 2-layer student initialised from its layers [0, 2].
"""

import pytest
import torch
import torch.distributed as dist

from megaloom.observe.metrics import read_metrics
from tests.tiny_pretrained import make

from .launch import run_workers, train_config

CASES = [("forward_kl", 0.5, 1.0, 0.0), ("reverse_kl", 0.5, 2.0, 0.0), ("jsd", 0.3, 0.7, 0.4)]


def _kernel_inputs():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    w = torch.randn(13, 8, generator=g, dtype=torch.float64)
    th = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    tw = torch.randn(13, 6, generator=g, dtype=torch.float64) * 1.5
    labels = torch.randint(0, 13, (2, 5), generator=g)
    labels[0, :2] = -100
    return h, w, th, tw, labels


def _kernel(rank, world, out):
    """This rank's 7 rows of both heads (rank 1: 6 and a padding row), h through the column-parallel f as in
    the model, so h.grad is the whole gradient."""
    from megaloom.compress.distill_loss import distill_loss
    from megaloom.parallel.comm import TPGroup, enter_tp

    tp = TPGroup(dist.group.WORLD, world, rank)
    h, w, th, tw, labels = _kernel_inputs()
    rows = 7
    pad = lambda m: torch.cat([m, m.new_zeros(rows * world - m.shape[0], m.shape[1])])  # noqa: E731
    w_shard, tw_shard = pad(w)[rank * rows:(rank + 1) * rows], pad(tw)[rank * rows:(rank + 1) * rows]
    real = min(rows, 13 - rank * rows)
    results = []
    for loss, beta, temperature, alpha in CASES:
        h1, w1 = h.clone().requires_grad_(), w_shard.clone().requires_grad_()
        terms = distill_loss(enter_tp(h1, tp), w1, th, tw_shard, labels, loss=loss, beta=beta, temperature=temperature,
                             alpha=alpha, group=tp, vocab_start=rank * rows, real=real, chunk=3)
        terms.loss.backward()
        results.append({"loss": terms.loss.item(), "kd": terms.kd.item(), "h": h1.grad, "w": w1.grad[:real]})
    torch.save(results, out / f"kernel{rank}.pt")


def _sets(tmp, *extra):
    return ["model.family='llama'", "model.layers=2", "model.hidden=64", "model.heads=4", "model.ffn_hidden=96",
            "model.vocab_size=320", "model.head='tied'", "model.seq_len=32", "model.max_positions=64",
            "model.rope_theta=500.0", "train.objective='distill'", f"distill.teacher='{tmp / 'teacher'}'",
            "distill.init_from_teacher_layers=[0, 2]", "distill.loss='jsd'", "distill.beta=0.3",
            "distill.temperature=2.0", "distill.alpha=0.3", "data.tokenizer='pretrained'", "data.max_bytes=30000",
            "data.val_fraction=0.2", f"data.dir='{tmp / 'corpus'}'", "train.global_batch=4", "train.micro_batch=2",
            "train.steps=3", "train.eval_every=3", "train.eval_batches=2", "train.warmup=1", "train.lr=0.01",
            "log.every=1", "log.progress=false", "log.tensorboard=false", "log.plot=false", *extra]


def _train(sets, run_dir, rank=0, world=1):
    train_config(sets, run_dir, rank, world)


def _worker(rank, world, tmp, runs):
    if runs and runs[0][1].name == "tp2-sp":
        _kernel(rank, world, tmp)
    for sets, run_dir in runs:
        _train(sets, run_dir, rank, world)


def _single(tmp):
    """The single-process run, its metrics."""
    make("llama-tied", tmp / "teacher", layers=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a tiny model's GEMMs only lose by spreading over shared cores
    try:
        _train(_sets(tmp), tmp / "single")
    finally:
        torch.set_num_threads(threads)
    return read_metrics(tmp / "single")


def _same(one, tmp, name):
    ours = read_metrics(tmp / name)
    assert [r["step"] for r in ours] == [r["step"] for r in one] == [1, 2, 3], name
    for a, b in zip(one, ours):
        for key in ("loss", "grad_norm", "distill/kd", "distill/ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (name, key, a["step"])
    assert ours[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5, abs=1e-5), name


def test_distill_tp2_equals_one_process(tmp_path):
    """The kernel at tp = 2 against TRL, and the trainer at tp = 2 with sequence parallelism against one process."""
    from tests.distill_refs import reference

    one = _single(tmp_path)
    assert one[-1]["loss"] < one[0]["loss"]
    extra = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    run_workers(_worker, 2, tmp_path, [(_sets(tmp_path, *extra), tmp_path / "tp2-sp")], timeout=300)

    h, w, th, tw, labels = _kernel_inputs()
    ranks = [torch.load(tmp_path / f"kernel{r}.pt") for r in range(2)]
    for i, (loss, beta, temperature, alpha) in enumerate(CASES):
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = reference(h2 @ w2.T, th @ tw.T, labels, loss, beta, temperature, alpha)
        ref.backward()
        for r in ranks:
            assert r[i]["loss"] == pytest.approx(ref.item(), abs=1e-6), loss
            assert torch.allclose(r[i]["h"], h2.grad, atol=1e-6), loss
        assert torch.allclose(torch.cat([r[i]["w"] for r in ranks]), w2.grad, atol=1e-6), loss
    _same(one, tmp_path, "tp2-sp")


@pytest.mark.slow
def test_distill_pp2_and_zero3_equal_one_process(tmp_path):
    """The teacher's own pipeline runner beside the student's (pp = 2), and a ZeRO-3 student over dp = 2 beside
    its replicated teacher, against one process."""
    one = _single(tmp_path)
    layouts = {"pp2": ["parallel.pp=2"], "dp2-zero3": ["parallel.dp=2", "parallel.zero=3"]}
    run_workers(_worker, 2, tmp_path, [(_sets(tmp_path, *extra), tmp_path / name) for name, extra in layouts.items()],
                timeout=600)
    for name in layouts:
        _same(one, tmp_path, name)
