"""LoRA and DoRA in parallel layouts equal PEFT on transformers: the same tiny pretrained base and the
same adapters (PEFT's, nonzero B, loaded into megaloom by PEFT key), fp32. At (t, p) = (2, 1) and
(1, 2), for tiny Llama (GQA, fused q/k/v and gate/up: one A/B pair per projection) and GPT-2 (Conv1D,
tied embedding across the two pipeline stages): the loss and every adapter gradient to 1e-5, five
AdamW steps of megaloom's step to 1e-4; and ZeRO-1, ZeRO-2 and ZeRO-3 (LoRA and DoRA) over dp = 2 (dp = 1
is PEFT's single process). Each launch is of two gloo processes; the default suite runs LoRA on Llama and DoRA on
GPT-2 at tp = 2, pp = 2, ZeRO-2 and ZeRO-3 (DoRA's norms need the whole frozen base row: FSDP2 gathers it
in the block's forward), the slow test every method and family, ZeRO-1 too, and tp = 2 with sequence
parallelism. (t, p) = (1, 1): tests/unit/test_peft.py."""

import pytest

from megaloom.config import load_config
from megaloom.parallel.launch import LaunchEnv, start
from tests.peft_refs import compare, megaloom_run, reference, sets
from tests.tiny_pretrained import make

from .launch import run_workers

FAMILY = {"llama-gqa": "llama", "gpt2": "gpt2"}
LAYOUTS = [dict(tp=2), dict(pp=2), dict(dp=2, zero=1), dict(dp=2, zero=2)]


def _worker(rank, world, dirs, refs, cases, layouts):
    for layout in layouts:
        grid = None
        for kind, method in cases:
            overrides = sets(dirs[kind], method, FAMILY[kind], **layout)
            if grid is None:  # one grid per layout (every rank creates every group)
                grid, _ = start(load_config(None, overrides), LaunchEnv(rank, world))
            ours = megaloom_run(dirs[kind], overrides, refs[kind, method]["state"], grid=grid)
            d = compare(ours, refs[kind, method], f"{kind} {method} {layout}")
            if rank == world - 1:  # one line per case (docs/finetuning.md, with -s)
                print(f"peft parity {kind} {method} {layout}: loss {d[0]:.1e}, gradients {d[1]:.1e}, "
                      f"5 AdamW steps {d[2]:.1e}")


def _run(tmp_path, cases, layouts=LAYOUTS):
    dirs, refs = {}, {}
    for kind, method in cases:
        if kind not in dirs:
            dirs[kind] = make(kind, tmp_path / kind, layers=2)
        refs[kind, method] = reference(dirs[kind], load_config(None, sets(dirs[kind], method, FAMILY[kind])))
    run_workers(_worker, 2, dirs, refs, cases, layouts, timeout=600)


def test_lora_llama_and_dora_gpt2_layouts_equal_peft(tmp_path):
    _run(tmp_path, [("llama-gqa", "lora"), ("gpt2", "dora")], [dict(tp=2), dict(pp=2), dict(dp=2, zero=2)])


@pytest.mark.slow
def test_every_method_and_family_layouts_equal_peft(tmp_path):
    _run(tmp_path, [(k, m) for k in FAMILY for m in ("lora", "dora")], [*LAYOUTS, dict(dp=2, zero=3), dict(tp=2, sp=True)])
