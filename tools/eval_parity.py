"""megaloom eval against lm-evaluation-harness on the same tiny random models and the same local task files.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m tools.eval_parity [--fewshot 2]

For a tiny GPT-2 (tied head, no BOS) and a tiny Llama (GQA, untied head, a tokenizer that adds BOS),
saved with transformers (tests/tiny_eval.py), both sides evaluate a perplexity task (three documents
as lm_eval's `loglikelihood_rolling`) and a multiple-choice task (24 items, `--fewshot` examples):
lm_eval 0.4.13 through `simple_evaluate` with its `HFLM` and task YAMLs that read the local files,
megaloom through `megaloom.eval`. Prints the largest relative difference of each perplexity figure and
of the per-document log-likelihoods, and how many items' acc and acc_norm agree. tests/e2e/test_eval_harness.py
asserts the same comparison.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def harness(model_dir: Path, tasks_dir: Path, fewshot: int, batch_size: int = 16) -> dict:
    """lm_eval's results: perplexity figures and per-document log-likelihoods, per-item acc, acc_norm and
    choice log-likelihoods (in file order)."""
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its truncation warnings: the 2-shot contexts are long

    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=["ml_ppl", "ml_choice"], num_fewshot=fewshot, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir)), verbosity="ERROR")
    ppl = sorted(out["samples"]["ml_ppl"], key=lambda s: s["doc_id"])
    choice = sorted(out["samples"]["ml_choice"], key=lambda s: s["doc_id"])
    tokenizer = lm.tokenizer
    return {
        **{k: out["results"]["ml_ppl"][f"{k},none"] for k in PPL_METRICS},
        "doc_lls": [float(s["filtered_resps"][0]) for s in ppl],
        "doc_tokens": [len(tokenizer(s["doc"]["text"]).input_ids) for s in ppl],  # what tok_encode predicts
        "acc": out["results"]["ml_choice"]["acc,none"], "acc_norm": out["results"]["ml_choice"]["acc_norm,none"],
        "items": [(s["acc"], s["acc_norm"], [float(r[0]) for r in s["filtered_resps"]]) for s in choice],
    }


def megaloom(model_dir: Path, files: dict[str, Path], fewshot: int, batch_size: int = 16) -> dict:
    """The same figures from megaloom.eval (one process), through MODEL resolution as `megaloom eval`."""
    from megaloom.eval.command import scorer_for
    from megaloom.eval.load import load_for_inference
    from megaloom.eval.spec import TaskSpec
    from megaloom.eval.tasks import run_task
    from megaloom.parallel.launch import LaunchEnv

    loaded = load_for_inference(model_dir, LaunchEnv(), device="cpu")
    scorer = scorer_for(loaded)
    ppl = run_task(TaskSpec("perplexity", [str(files["ppl"])], batch_size=batch_size), scorer, loaded.tokenizer)
    choice = run_task(TaskSpec("choice", [str(files["choice"])], fewshot=fewshot, batch_size=batch_size), scorer,
                      loaded.tokenizer)
    return {
        **{k: ppl.metrics[k] for k in PPL_METRICS}, "token_perplexity": ppl.metrics["token_perplexity"],
        "doc_lls": [d["ll"] for d in ppl.details], "doc_tokens": [d["tokens"] for d in ppl.details],
        "acc": choice.metrics["acc"], "acc_norm": choice.metrics["acc_norm"],
        "items": [(d["acc"], d["acc_norm"], d["lls"]) for d in choice.details],
    }


def compare(theirs: dict, ours: dict) -> dict:
    """Largest relative differences and item agreement."""
    rel = {k: abs(ours[k] - theirs[k]) / abs(theirs[k]) for k in PPL_METRICS}
    rel["doc_ll"] = max(abs(a - b) / abs(b) for a, b in zip(ours["doc_lls"], theirs["doc_lls"]))
    pairs = list(zip(ours["items"], theirs["items"]))
    return {
        "rel": rel,
        "choice_ll_abs": max(abs(a - b) for o, t in pairs for a, b in zip(o[2], t[2])),
        "acc_items_equal": sum(o[0] == t[0] for o, t in pairs), "acc_norm_items_equal": sum(o[1] == t[1] for o, t in pairs),
        "items": len(pairs), "tokens_equal": ours["doc_tokens"] == theirs["doc_tokens"],
    }


def main() -> None:
    from tests.tiny_eval import make_tiny_hf, write_task_files

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fewshot", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_task_files(Path(tmp) / "data")
        for family in ("gpt2", "llama"):
            model_dir = make_tiny_hf(Path(tmp) / family, family)
            theirs, ours = harness(model_dir, files["tasks"], args.fewshot), megaloom(model_dir, files, args.fewshot)
            c = compare(theirs, ours)
            print(f"{family}: byte_perplexity {ours['byte_perplexity']:.6f} (lm_eval {theirs['byte_perplexity']:.6f}), "
                  f"bits_per_byte {ours['bits_per_byte']:.6f} (lm_eval {theirs['bits_per_byte']:.6f}); largest relative "
                  + ", ".join(f"{k} {v:.1e}" for k, v in c["rel"].items())
                  + f"; tokens equal: {c['tokens_equal']}; choice ({args.fewshot}-shot): acc {ours['acc']:.4f} (lm_eval "
                  f"{theirs['acc']:.4f}), acc_norm {ours['acc_norm']:.4f} (lm_eval {theirs['acc_norm']:.4f}), "
                  f"items equal {c['acc_items_equal']}/{c['items']} (acc), {c['acc_norm_items_equal']}/{c['items']} "
                  f"(acc_norm), largest |ll difference| {c['choice_ll_abs']:.1e}")


if __name__ == "__main__":
    main()
