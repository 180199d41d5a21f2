"""(IA)³, prefix and prompt tuning against PEFT + transformers, on tiny Llama (GQA) and GPT-2:

- in every layout the loss and every adapter gradient equal PEFT's to 1e-5 (fp32): (t, p) = (1, 1) in
  this process, (2, 1), (2, 1) with sequence parallelism and (1, 2) (the pipeline runtime; the soft
  prompt makes the activations between stages longer) in one launch of two processes. Houlsby adapters
  (no PEFT equivalent; their formula: tests/unit/test_tune_methods.py) at tp = 2, with and without
  sequence parallelism, equal the single process;
- the soft prompt initialised from a text equals PEFT's TEXT init (at tp = 2 too);
- an adapter saved by PEFT loads through peft.init with equal logits (its adapter_config.json sets the
  method, the virtual tokens, the targets);
- a megaloom run's adapters exported by `megaloom convert RUN OUT --to peft` load in
  `PeftModel.from_pretrained` with equal logits (prefix tuning by default: every layer's prefix put
  together into PEFT's one prompt_embeddings; the other methods and family in the slow test);
- (slow) five steps of the trainer's parts (PeftHook, setup_training, train_step) give PEFT's losses to
  1e-4 at (t, p, d, ZeRO) = (1, 1, 1, 0), (2, 1, 1, 0), (1, 2, 1, 0), (1, 1, 2, 3).
Everything shares one set of tiny models and one import of transformers and PEFT: the default suite's
budget."""

import importlib

import pytest
import torch
import torch.distributed as dist

from megaloom.config import load_config
from megaloom.interop import load_model, load_parallel_model
from megaloom.parallel.grid import Axis, ProcessGrid
from megaloom.parallel.tensor import sync_replicated_grads
from megaloom.tune import prompt as prompt_tuning
from tests import tune_refs as R
from tests.tiny_pretrained import VOCAB, make

from .launch import run_workers

KINDS = ("llama-gqa", "gpt2")
T = 16
S = torch.randint(0, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(3))
X, Y = S[:, :-1], S[:, 1:]
LAYOUTS = [(2, 1, False), (2, 1, True), (1, 2, False)]  # (tp, pp, sequence parallel)
TEXT = "import os, sys"  # peft.prompt_init_text: more tokens than VT
MODULE = {"ia3": "megaloom.tune.ia3", "prefix": "megaloom.tune.prompt", "prompt": "megaloom.tune.prompt",
          "adapter": "megaloom.tune.adapter"}


def _overrides(method, tp, pp, sp):
    return [f"peft.method='{method}'", f"peft.virtual_tokens={R.VT}", "peft.bottleneck=8", f"model.seq_len={T}",
            f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.sequence_parallel={'true' if sp else 'false'}",
            'parallel.schedule="gpipe"', "train.micro_batch=2", "train.global_batch=2"]


def _loss_and_grads(directory, method, grid, layout, values):
    """This layout's loss (on every rank) and full adapter gradients {megaloom name: (key, grad)}."""
    tp, pp, sp = layout
    overrides = _overrides(method, tp, pp, sp)
    pm, _, _ = load_parallel_model(directory, grid, torch.device("cpu"), [*overrides, "peft.method='none'"])
    cfg = load_config(None, [f"model.pretrained={str(directory)!r}", *overrides])  # the base frozen, the method's cfg
    mod = importlib.import_module(MODULE[method])
    chunks = list(pm.model) if pm.runner is not None else [pm.model]
    for chunk in chunks:
        mod.apply(chunk, cfg, pm.tp)
    if values is not None:
        R.load_into(pm.model, mod, values, cfg)
    else:  # Houlsby: up-projections away from zero, the same full values on every rank
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                if p.requires_grad:
                    gen = torch.Generator().manual_seed(sum(map(ord, name)))
                    with torch.no_grad():
                        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    if pm.runner is not None:
        loss = pm.runner.forward_backward([(X, Y)], "fp32")
        dist.broadcast(loss, src=grid.ranks(Axis.PP)[-1])  # the last stage's loss, for every rank's check
    else:
        loss = pm.model(X, Y)
        loss.backward()
        if pm.tp is not None:
            sync_replicated_grads(pm.model, pm.tp)
    return loss.item(), R.megaloom_grads(pm.model, mod, cfg, pm.tp), mod, cfg


def _check(case, method, grid, got, expected):
    """This rank's loss and gradients against PEFT's (`expected`: reference()) or, for Houlsby adapters,
    the single process's (loss, {name: grad})."""
    loss, grads, mod, cfg = got
    ref_loss, values, ref_grads = expected
    assert abs(loss - ref_loss) <= 1e-5, (case, loss, ref_loss)
    assert grads or (method == "prompt" and grid.pp_rank > 0), case  # the prompt: first stage only
    worst = 0.0
    for name, (key, g) in grads.items():
        want = ref_grads[name] if method == "adapter" else R.expected_grad(name, key, ref_grads, mod, cfg)
        diff = (g - want).abs().max().item()
        assert diff <= 1e-5 * max(1.0, want.abs().max().item()), (case, name, diff)
        worst = max(worst, diff / want.abs().max().item())
    if grid.rank == 0:  # one line per case (docs/finetuning.md, with -s)
        against = "one process" if method == "adapter" else "PEFT"
        print(f"parity {case}: |loss - {against}| = {abs(loss - ref_loss):.1e}, "
              f"max |gradient difference| / max |gradient| = {worst:.1e}")


def _run_layout(rank, world, layout, dirs, expected):
    tp, pp, sp = layout
    grid = None
    for kind in KINDS:
        for method in R.METHODS + ("adapter",):
            if method == "adapter" and tp == 1:  # Houlsby: tp = 2 against the one process
                continue
            if grid is None:  # one grid per layout (every rank creates every group)
                cfg = load_config(None, [f"model.pretrained={str(dirs[kind])!r}", *_overrides(method, tp, pp, sp)])
                grid = ProcessGrid.build(tp, pp, 1, rank=rank, world_size=world, model=cfg.model)
            want = expected[kind, method]
            got = _loss_and_grads(dirs[kind], method, grid, layout, want[1] if method != "adapter" else None)
            _check(f"{kind} {method} (t, p, sp) = {layout}", method, grid, got, want)
        if tp > 1:  # the text's embeddings from the vocabulary-parallel table: each rank's rows, summed
            overrides = [*_overrides("prompt", tp, pp, sp), f"peft.prompt_init_text={TEXT!r}"]
            pm, _, _ = load_parallel_model(dirs[kind], grid, torch.device("cpu"), [*overrides, "peft.method='none'"])
            prompt_tuning.apply(pm.model, load_config(None, [f"model.pretrained={str(dirs[kind])!r}", *overrides]), pm.tp)
            torch.testing.assert_close(pm.model.prompt.detach(), expected[kind, "text"], rtol=0, atol=0)


def _worker(rank, world, dirs, expected):
    for layout in LAYOUTS:
        _run_layout(rank, world, layout, dirs, expected)


def test_methods_equal_peft(tmp_path):
    dirs, expected, models = {}, {}, {}
    for kind in KINDS:
        dirs[kind] = make(kind, tmp_path / kind, layers=2)
        models[kind] = {}
        for method in R.METHODS:
            expected[kind, method] = R.reference(dirs[kind], method, X, Y, keep=models[kind])
        grid = ProcessGrid.build(1, 1, 1, rank=0, world_size=1)
        loss, grads, _, _ = _loss_and_grads(dirs[kind], "adapter", grid, (1, 1, False), None)
        expected[kind, "adapter"] = (loss, None, {name: g for name, (_, g) in grads.items()})
        expected[kind, "text"] = R.peft_text_prompt(dirs[kind], TEXT)
    _run_layout(0, 1, (1, 1, False), dirs, expected)
    for kind in KINDS:
        for text in ("def", TEXT):  # fewer tokens than VT (repeated) and more (cut)
            _check_text_init(dirs[kind], text)
        for method, theirs in models[kind].items():
            _check_peft_init(dirs[kind], method, theirs, tmp_path / f"peft-{kind}-{method}")
    _check_export(dirs["llama-gqa"], "prefix", tmp_path / "export")
    run_workers(_worker, 2, dirs, expected, timeout=240)


@pytest.mark.slow
def test_every_method_exports_to_peft(tmp_path):
    for kind in KINDS:
        directory = make(kind, tmp_path / kind, layers=2)
        for method in R.METHODS:
            _check_export(directory, method, tmp_path / f"export-{kind}-{method}")


def _check_text_init(directory, text):
    """peft.prompt_init_text: the text's token embeddings, repeated or cut, as PEFT's TEXT init."""
    overrides = [*_overrides("prompt", 1, 1, False), f"peft.prompt_init_text={text!r}"]
    model, _, _ = load_model(directory, overrides=[*overrides, "peft.method='none'"])
    cfg = load_config(None, [f"model.pretrained={str(directory)!r}", *overrides])
    model.requires_grad_(False)
    prompt_tuning.apply(model, cfg, None)
    torch.testing.assert_close(model.prompt.detach(), R.peft_text_prompt(directory, text), rtol=0, atol=0)


def _peft_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits[:, -tokens.shape[1]:]  # PEFT's prompt tuning returns its positions too


def _check_peft_init(directory, method, theirs, out):
    """An adapter PEFT saved (`theirs`, the reference's model), through peft.init (PeftHook: freeze, apply,
    load): equal logits."""
    from megaloom.tune.peft import PeftHook

    theirs.save_pretrained(out)
    ours, _, _ = load_model(directory)
    hook = PeftHook(load_config(None, [f"model.pretrained='{directory}'", f"model.seq_len={T}", f"peft.init='{out}'"]))
    assert hook.cfg.peft.method == method and (method == "ia3" or hook.cfg.peft.virtual_tokens == R.VT)
    hook(ours, None)
    hook.loaded(ours, fresh=True)
    with torch.no_grad():
        diff = (ours.eval()(X) - _peft_logits(theirs.eval(), X)).abs().max().item()
    assert diff <= 1e-5, f"{directory.name} {method} adapter saved by PEFT, loaded by peft.init: max |logit diff| = {diff}"


def _check_export(directory, method, root):
    """Two steps of `megaloom train` with the method, `megaloom convert --to peft`, PEFT loads it: equal logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megaloom.cli import main

    run, out = root / "run", root / "adapter"
    args = [f"model.pretrained='{directory}'", "model.seq_len=24", "train.steps=2", "train.global_batch=2",
            "train.micro_batch=2", "train.lr=0.05", "train.warmup=0", "train.eval_batches=1", "train.samples=0",
            "data.max_bytes=15000", "data.val_fraction=0.3", f"data.dir='{root.parent / ('corpus-' + directory.name)}'",
            "log.progress=false", "log.tensorboard=false", "log.plot=false", f"peft.method='{method}'",
            f"peft.virtual_tokens={R.VT}"]
    assert main(["train", "--run-dir", str(run), *[a for s in args for a in ("--set", s)]]) == 0
    ours, _, _ = load_model(run)
    with torch.no_grad():
        logits = ours(X)
    assert main(["convert", str(run), str(out), "--to", "peft"]) == 0
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), out)
    diff = (_peft_logits(theirs.eval(), X) - logits).abs().max().item()
    assert diff <= 1e-5, f"{directory.name} {method}: exported adapter in PEFT, max |logit difference| = {diff}"


STEP_LAYOUTS = [(1, 1, 1, 0), (2, 1, 1, 0), (1, 2, 1, 0), (1, 1, 2, 3)]  # (tp, pp, dp, zero)


def _steps_worker(rank, world, dirs, expected):
    for layout in STEP_LAYOUTS[1:]:
        for (kind, method), want in expected.items():
            mod = importlib.import_module(MODULE[method])
            losses = R.megaloom_steps(dirs[kind], mod, R.step_sets(dirs[kind], method, *layout), want[1], S,
                                      rank, world)
            diff = max(abs(a - b) for a, b in zip(losses, want[0]))
            if rank == 0:
                print(f"five steps {kind} {method} (t, p, d, zero) = {layout}: max |loss - PEFT| = {diff:.1e}")
            assert diff <= 1e-4, (kind, method, layout, losses, want[0])


@pytest.mark.slow
def test_five_adamw_steps_equal_peft_in_every_layout(tmp_path):
    """The trainer's own parts (PeftHook, setup_training, train_step): five steps' losses equal PEFT's to
    1e-4 at (t, p, d, ZeRO) = (1, 1, 1, 0) here, (2, 1, 1, 0), (1, 2, 1, 0), (1, 1, 2, 3) in one launch."""
    dirs, expected = {}, {}
    for kind in KINDS:
        dirs[kind] = make(kind, tmp_path / kind, layers=2)
        for method in R.METHODS:
            cfg = load_config(None, R.step_sets(dirs[kind], method))
            expected[kind, method] = R.peft_steps(dirs[kind], method, cfg, S)
            mod = importlib.import_module(MODULE[method])
            losses = R.megaloom_steps(dirs[kind], mod, R.step_sets(dirs[kind], method), expected[kind, method][1], S)
            diff = max(abs(a - b) for a, b in zip(losses, expected[kind, method][0]))
            assert diff <= 1e-4, (kind, method, losses, expected[kind, method][0])
    run_workers(_steps_worker, 2, dirs, expected, timeout=600)
