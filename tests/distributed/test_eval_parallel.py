"""megaloom eval and generate in parallel layouts equal one process: the same perplexity, the same
choice scores item by item, the same greedy chat reply, on a tiny Hugging Face Llama (GQA) loaded
through megaloom.interop, and the same sampled (temperature 1) generation. The model has 385 vocabulary
rows, which tp = 2 splits as 193 + 192 and a padding row that no score or sample ever sees. One launch of
two gloo processes runs tp = 2, pp = 2 and dp = 2; the slow variant launches four for tp x pp = 2 x 2 and
each of them beside dp = 2."""

import pytest

from megaloom.eval.command import scorer_for
from megaloom.eval.generate import Sampling, chat_prompt, generate_parallel
from megaloom.eval.load import load_for_inference
from megaloom.eval.spec import TaskSpec
from megaloom.eval.tasks import run_task
from megaloom.parallel.launch import LaunchEnv
from tests.tiny_eval import make_tiny_hf, write_task_files

from .launch import run_workers

LAYOUTS = {2: [(2, 1), (1, 2), (1, 1)], 4: [(2, 2), (1, 2), (2, 1)]}  # processes: [(tp, pp)], dp = the rest
GREEDY = Sampling(max_new_tokens=6, temperature=0.0)
SAMPLED = Sampling(max_new_tokens=6, temperature=1.0, top_k=0, seed=3)  # over the whole vocabulary


def _specs(files):
    return [TaskSpec("perplexity", [str(files["ppl"])], max_length=24, batch_size=3),
            TaskSpec("choice", [str(files["choice"])], fewshot=1, batch_size=5)]


def _run(path, files, env, tp, pp):
    loaded = load_for_inference(path, env, tp, pp, "cpu")
    results = [run_task(spec, scorer_for(loaded), loaded.tokenizer) for spec in _specs(files)]
    prompt = chat_prompt(loaded.tokenizer, "def open", "import")
    reply = generate_parallel(loaded.pm, loaded.grid, prompt, 1, GREEDY, loaded.device, loaded.tokenizer.eos_id)
    assert len(reply[0]) > len(prompt)  # something was generated
    reply += generate_parallel(loaded.pm, loaded.grid, prompt, 2, SAMPLED, loaded.device)
    assert max(max(r) for r in reply) < loaded.cfg.model.vocab_size == 385  # never a padding id
    return [r.metrics for r in results], [r.details for r in results], reply


def _worker(rank, world, path, files, expected):
    for tp, pp in LAYOUTS[world]:
        metrics, details, reply = _run(path, files, LaunchEnv(rank, world, rank), tp, pp)
        where = f"(tp, pp, dp) = ({tp}, {pp}, {world // (tp * pp)}), rank {rank}"
        for got, want in zip(metrics, expected[0]):
            assert got == pytest.approx(want, rel=1e-5, nan_ok=True), where
        perplexity, choice = details
        assert [d["tokens"] for d in perplexity] == [d["tokens"] for d in expected[1][0]], where
        assert [(d["pred"], d["pred_norm"]) for d in choice] == [(d["pred"], d["pred_norm"]) for d in expected[1][1]]
        for got, want in zip(choice, expected[1][1]):
            assert got["lls"] == pytest.approx(want["lls"], rel=1e-5, abs=1e-5), where
        assert reply == expected[2], where


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_eval_and_chat_in_parallel_layouts_equal_one_process(tmp_path, world):
    path = make_tiny_hf(tmp_path / "llama", "llama", extra_rows=1)  # 385 rows: odd
    files = write_task_files(tmp_path / "data", n_choice=12)
    expected = _run(path, files, LaunchEnv(), 1, 1)
    run_workers(_worker, world, path, files, expected, timeout=240)
