"""tools/build_choice.py: the offline docstring -> function-name multiple-choice set is deterministic,
in the format `megaloom eval --task choice` reads, and each item's answer is the documented function."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from megaloom.eval.tasks import read_choice_items

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def builder():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("build_choice", ROOT / "tools" / "build_choice.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_choice"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_modules(src: Path) -> None:
    """Three modules of six documented functions, one private, one whose docstring names it, one
    method of a public class; and a module with too few functions."""
    for m in ("alpha", "beta", "gamma"):
        body = [f'def {m}_{i}(x):\n    """Compute step {i} of the {m} procedure on x.\n\n    More text."""\n'
                for i in range(6)]
        body.append('def _hidden():\n    """A private helper, never asked about."""\n')
        body.append(f'def tell():\n    """Call tell to get the answer of {m}."""\n')
        body.append('class Box:\n    def open_lid(self):\n        """Lift the top of the container."""\n')
        (src / f"{m}.py").write_text("\n".join(body))
    (src / "small.py").write_text('def one():\n    """Only one function here, too few for choices."""\n')
    (src / "argparse.py").write_text("\n".join(f'def f{i}():\n    """Excluded: the calibration text."""\n'
                                               for i in range(6)))


def test_same_seed_same_bytes_and_the_eval_format(builder, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_modules(src)
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    info = builder.build(a, n=12, seed=3, source=src, per_module=4)
    assert builder.build(b, n=12, seed=3, source=src, per_module=4) == info
    assert a.read_bytes() == b.read_bytes()
    builder.build(c, n=12, seed=4, source=src, per_module=4)
    assert c.read_bytes() != a.read_bytes()
    builder.build(c, n=5, seed=3, source=src, per_module=4)  # a smaller set is the larger one's first items
    assert a.read_text().splitlines()[:5] == c.read_text().splitlines()
    assert info["items"] == 12 and info["modules"] == 3  # at most 4 from each of the three modules

    items = read_choice_items([str(a)])  # what megaloom eval --task choice reads; it raises on a bad line
    assert len(items) == 12
    for line, item in zip(a.read_text().splitlines(), items):
        obj = json.loads(line)
        module, doc = obj["context"].split("\n")[0][2:-3], obj["context"].split("\n")[1][2:]
        assert obj["context"].endswith("\ndef") and module in ("alpha", "beta", "gamma")
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert all(c.endswith("(") for c in item.choices)
        answer = item.choices[item.answer][:-1]
        assert not any(c[:-1].lower() in doc.lower() for c in item.choices)  # no name given away
        assert answer not in ("_hidden", "tell")  # private, or named in its own docstring
        tree = ast.parse((src / f"{module}.py").read_text())
        docs = {n.name: ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert builder.first_paragraph(docs[answer]) == doc  # the answer is the function documented
        assert all(c[:-1] in docs for c in item.choices)  # every choice from the same module


def test_the_standard_library_gives_a_few_hundred_items(builder, tmp_path):
    info = builder.build(tmp_path / "std.jsonl", n=300, seed=0)
    assert info["items"] == 300 and info["modules"] >= 50
    contexts = [json.loads(line)["context"] for line in (tmp_path / "std.jsonl").read_text().splitlines()]
    assert not any(ctx.startswith(("# argparse.py", "# json")) for ctx in contexts)
    answers = [json.loads(line)["answer"] for line in (tmp_path / "std.jsonl").read_text().splitlines()]
    assert all(answers.count(i) > 40 for i in range(4))  # the answer's position is not a giveaway
