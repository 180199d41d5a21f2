"""Every module imports on its own, and the layers point one way (DESIGN principle 6):
config <- model, parallel <- train <- cli; parallel knows no model and no training loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import megaloom

PACKAGE = Path(megaloom.__file__).parent

# what each part of the package may import from megaloom (besides itself); `perf` and `observe` are
# the planner and the reporting, which sit beside train and read config, layout and the schedules
BOTTOM = {"megaloom.errors", "megaloom.layout", "megaloom.precision"}
ALLOWED = {
    "megaloom.errors": set(),
    "megaloom.layout": {"megaloom.errors"},
    "megaloom.precision": set(),
    # model.pretrained: the config reads a pretrained model's shape through interop.hparams, which itself
    # imports nothing of megaloom but the bottom modules (weights are read from interop's upper modules)
    "megaloom.config": BOTTOM | {"megaloom.interop.hparams", "megaloom.tune.nf4_layout"},
    "megaloom.interop.hparams": BOTTOM,
    # the config checks QLoRA's layout rules on the model's shape before anything is built; the rules are
    # torch-free and read the config's types only for annotations
    "megaloom.tune.nf4_layout": BOTTOM | {"megaloom.config"},
    "megaloom.parallel": BOTTOM | {"megaloom.config"},
    "megaloom.model": BOTTOM | {"megaloom.config", "megaloom.parallel"},
    "megaloom.data": BOTTOM | {"megaloom.config"},
    # a PEFT run's checkpoint is loaded for inference with its adapter modules built first (megaloom.tune)
    "megaloom.interop": BOTTOM | {"megaloom.config", "megaloom.parallel", "megaloom.model", "megaloom.data",
                                  "megaloom.train", "megaloom.tune"},
    # parameter-efficient methods put their modules on the model and are passed down to the training loop;
    # they read the pretrained base and write adapters through interop, its peer (each imports the other
    # only inside functions, so either imports on its own)
    "megaloom.tune": BOTTOM | {"megaloom.config", "megaloom.parallel", "megaloom.model", "megaloom.data",
                               "megaloom.train", "megaloom.interop"},
    # evaluation and chat load models through interop (and quantized checkpoints through compress) and run
    # them with the training stack
    "megaloom.eval": BOTTOM | {"megaloom.config", "megaloom.parallel", "megaloom.model", "megaloom.data",
                               "megaloom.train", "megaloom.observe", "megaloom.interop", "megaloom.compress"},
    # compression loads MODEL through interop and compresses it with the training stack's models
    "megaloom.compress": BOTTOM | {"megaloom.config", "megaloom.parallel", "megaloom.model", "megaloom.data",
                                   "megaloom.train", "megaloom.interop"},
    # alignment (reward model, DPO, PPO, GRPO) sits on the training stack, like tune and eval; its rollouts
    # sample with the generation of `megaloom generate` (eval.generate)
    "megaloom.align": BOTTOM | {"megaloom.config", "megaloom.parallel", "megaloom.model", "megaloom.data",
                                "megaloom.train", "megaloom.observe", "megaloom.eval"},
}


def modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] != "__main__":  # runs the command line when imported
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported(module: str) -> set[str]:
    """The megaloom modules `module` imports, at any depth of its code (deferred imports count)."""
    rel = module.replace(".", "/")
    path = PACKAGE.parent / (rel + ".py")
    if not path.exists():
        path = PACKAGE.parent / rel / "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megaloom"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("megaloom"))
    return out


def part(module: str) -> str:
    top = ".".join(module.split(".")[:2])
    return top


def test_every_module_imports_on_its_own():
    """Each module imported first, with no other megaloom module loaded (torch stays loaded: it is not
    part of any cycle), in one fresh interpreter. A cycle between two modules fails here for whichever
    of them is imported first."""
    script = (
        "import importlib, sys, traceback\n"
        "import torch\n"
        f"names = {modules()!r}\n"
        "bad = []\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m == 'megaloom' or m.startswith('megaloom.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_issue_modules_import_in_a_fresh_interpreter():
    """The three imports that failed before the layers were untangled, each in its own interpreter."""
    for name in ("megaloom.parallel.tensor", "megaloom.parallel.grads", "megaloom.train.step"):
        run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{name}: {run.stderr.strip().splitlines()[-1:]}"


def test_layers_point_one_way():
    wrong = []
    for module in modules():
        key = module if module in ALLOWED else part(module)
        if key not in ALLOWED:
            continue
        for dep in imported(module):
            if part(dep) == part(module):
                continue  # inside its own part
            if dep not in ALLOWED[key] and part(dep) not in ALLOWED[key]:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "; ".join(wrong)


def test_the_layer_check_sees_a_violation():
    """The check above can fail: `model` importing `train` is reported."""
    assert "megaloom.train" not in ALLOWED["megaloom.model"]
    assert "megaloom.train.checkpoint" in imported("megaloom.train.trainer")
