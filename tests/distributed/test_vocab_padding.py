"""A vocabulary that t does not divide (V = 331, a prime): each rank holds ceil(V/t) rows, the last rank's
extra rows are padding. At t = 2 and t = 3 the logits, the loss and the gradients equal one process, the
padding's gradient is zero and stays zero through AdamW steps; a run saved at t = 2 (a checkpoint of exactly
V rows) loads at t = 3 and at t = 1 and continues as the single-process run does; exported, transformers
reads it and gives the same logits. One launch of three gloo processes (t = 2 on ranks 0 and 1)."""

import torch
import torch.distributed as dist

from megaloom.config import load_config, to_toml
from megaloom.model import build_model
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.grads import GradSync
from megaloom.parallel.tensor import gather_vocab
from megaloom.train.checkpoint import load, saved_keys, write_directory
from megaloom.train.optim import build_optimizer
from megaloom.train.sharded_state import init_optimizer_state, model_entries, optimizer_entries, set_optimizer_step
from megaloom.train.step import train_step

from .launch import run_workers

V, SEED, SAVED_AT = 331, 7, 3  # ceil(331/2) = 166: one padding row; ceil(331/3) = 111: two


def _cfg(family, tp=1):
    return load_config(None, [f"model.family='{family}'", "model.layers=2", "model.hidden=48", "model.heads=6",
                              "model.ffn_hidden=96", f"model.vocab_size={V}", "model.seq_len=16",
                              "data.vocab_size=300", "train.lr=1e-2", f"parallel.tp={tp}"])


def _batch(step):
    x = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(step))
    x[0, 1:] = V - 1  # the last real row, on the last rank, is a target and an input
    return x[:, :-1], x[:, 1:]


def _train(model, opt, sync, steps):
    out = []
    for step in steps:
        x, y = _batch(step)
        out.append(train_step(model, opt, list(zip(x.split(2), y.split(2))), grad_clip=0.5, sync=sync).loss.item())
    return torch.tensor(out)


def _padding(model, tensors=None):
    """Every padding row of `model`'s vocabulary shards (or of `tensors`, laid out like its parameters)."""
    out = []
    for name, p in model.named_parameters():
        spec = getattr(p, "shard_spec", None)
        if spec is not None and spec.dim == 0 and spec.real(spec.full_shape[0]) < p.shape[0]:  # the vocabulary's
            out.append((name, (p if tensors is None else tensors(p))[spec.real(spec.full_shape[0]):]))
    return out


def _gathered(p, g, tp):
    parts = [torch.empty_like(g) for _ in range(tp.size)]
    dist.all_gather(parts, g.contiguous(), group=tp.group)
    return p.shard_spec.assemble(parts)


def _restore(cfg, tmp, tp, group):
    """A model of another layout (initialised from another seed) and its optimizer, loaded from the checkpoint."""
    model = build_model(cfg.model, SEED + 1, tp=tp)
    opt = build_optimizer(model, cfg.train)
    init_optimizer_state(opt)
    state = {**model_entries(model), **optimizer_entries(model, opt)[0], "train": None}
    with torch.no_grad():
        objects = load(tmp, state, group)
    set_optimizer_step(opt, objects["train"]["adam_step"])
    return model, opt


def _worker(rank, world, tmp):
    pair = dist.new_group([0, 1])  # t = 2 on ranks 0 and 1 (every rank creates every group)
    for family in ("gpt2", "llama"):  # tied and untied head
        cfg = _cfg(family)
        ref = build_model(cfg.model, SEED)
        x, y = _batch(0)
        ref_logits, ref_loss = ref(x), ref(x, y)
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        ref = build_model(cfg.model, SEED)
        ref_curve = _train(ref, build_optimizer(ref, cfg.train), None, range(SAVED_AT + 2))

        for t, group in ((2, pair), (3, dist.group.WORLD)):
            if rank >= t:
                continue
            tp = TPGroup(group, t, rank)
            model = build_model(cfg.model, SEED, tp=tp)
            assert all(torch.all(pad == 0) for _, pad in _padding(model)), "padding rows start at zero"
            logits = gather_vocab(model(x), tp, V)
            assert logits.shape[-1] == V
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            loss = model(x, y)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            loss.backward()
            for name, p in model.named_parameters():
                g = _gathered(p, p.grad, tp) if getattr(p, "shard_spec", None) else p.grad
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=f"{family} t={t} {name}")
            pads = _padding(model, lambda p: p.grad)
            assert (len(pads) > 0) == (rank == t - 1), "the last rank holds the padding"
            assert all(torch.all(g == 0) for _, g in pads), f"{family} t={t}: padding gradient"

        if rank < 2:  # train at t = 2, save
            tp = TPGroup(pair, 2, rank)
            model = build_model(cfg.model, SEED, tp=tp)
            opt = build_optimizer(model, cfg.train)
            curve = _train(model, opt, GradSync(model, tp), range(SAVED_AT))
            torch.testing.assert_close(curve, ref_curve[:SAVED_AT], rtol=1e-5, atol=1e-5, msg=f"{family} t=2")
            for name, pad in _padding(model) + _padding(model, lambda p, state=opt.state: state[p]["exp_avg_sq"]):
                assert torch.all(pad == 0), f"{family}: {name}'s padding moved in training"
            moments, adam_step = optimizer_entries(model, opt)
            state = {**model_entries(model), **moments, "train": {"adam_step": adam_step}}
            write_directory(tmp / family, state, to_toml(_cfg(family, 2)), SAVED_AT, {"tp": 2}, rank, pair)
        dist.barrier()
        shapes = saved_keys(tmp / family)
        assert shapes["model/embed.tok.weight"] == (V, 48)  # exactly V rows, no padding
        assert family == "gpt2" or shapes["model/head.weight"] == (V, 48)

        model, opt = _restore(cfg, tmp / family, TPGroup(dist.group.WORLD, 3, rank), dist.group.WORLD)  # t = 3
        curve = _train(model, opt, GradSync(model, model.tp), range(SAVED_AT, SAVED_AT + 2))
        torch.testing.assert_close(curve, ref_curve[SAVED_AT:], rtol=1e-5, atol=1e-5, msg=f"{family} t=2 -> 3")
        model, opt = _restore(cfg, tmp / family, None, None)  # t = 1, each rank on its own
        curve = _train(model, opt, None, range(SAVED_AT, SAVED_AT + 2))
        torch.testing.assert_close(curve, ref_curve[SAVED_AT:], rtol=1e-5, atol=1e-5, msg=f"{family} t=2 -> 1")


def test_padded_vocabulary_trains_saves_and_loads_like_one_process(tmp_path):
    from transformers import AutoModelForCausalLM

    from megaloom.interop.export import export_hf
    from megaloom.train.checkpoint import load_weights

    run_workers(_worker, 3, tmp_path, timeout=240)
    # the checkpoint saved at t = 2, exported: V rows that transformers loads, with megaloom's logits
    export_hf(tmp_path / "llama", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.get_output_embeddings().weight.shape == (V, 48)
    model = build_model(_cfg("llama").model, SEED + 1)
    load_weights(model, tmp_path / "llama")
    x, _ = _batch(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)
