"""The command line of evaluation and chat: train.eval_tasks rows in metrics.jsonl equal `megaloom eval`
on the saved run (which appends its own row), a chat prompt is transformers' apply_chat_template, and
bad input is one line."""

import json

import pytest

from megaloom.cli import main
from megaloom.observe.metrics import read_metrics
from tests.e2e.test_cli import corpus_args
from tests.tiny_eval import make_tiny_hf, write_task_files


def test_eval_tasks_during_training_equal_megaloom_eval(tiny_corpus, tmp_path, capsys):
    files = write_task_files(tmp_path / "data", n_choice=10)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20, encoding="utf-8")
    run = tmp_path / "run"
    tasks = json.dumps([f"--task choice --data {files['choice']} --fewshot 1",
                        f"--task perplexity --data {text} --max-length 32 --name code"])
    assert main(["train", "configs/debug.toml", "--run-dir", str(run), *corpus_args(tiny_corpus),
                 "--set", "train.steps=4", "--set", "train.eval_every=4", "--set", "log.progress=false",
                 "--set", "log.tensorboard=false", "--set", "log.plot=false", "--set", f"train.eval_tasks={tasks}"]) == 0
    row = read_metrics(run)[-1]
    assert row["step"] == 4 and row["eval/choice/n"] == 10 and row["eval/code/tokens"] > 0
    capsys.readouterr()

    assert main(["eval", str(run), "--task", "choice", "--data", str(files["choice"]), "--fewshot", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["acc"] == row["eval/choice/acc"] and out["acc_norm"] == row["eval/choice/acc_norm"]
    assert main(["eval", str(run), "--task", "perplexity", "--data", str(text), "--max-length", "32", "--json",
                 "--batch-size", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bits_per_byte"] == pytest.approx(row["eval/code/bits_per_byte"], rel=1e-6)
    assert out["words"] == 6 * 20 + 1 and out["bytes"] == len(text.read_bytes())  # re.split(r"\s+"): a trailing ""
    appended = read_metrics(run)[-2:]  # megaloom eval's own rows, at the checkpoint's step
    assert [r["step"] for r in appended] == [4, 4] and "eval/text/token_perplexity" in appended[1]


def test_chat_prompt_is_apply_chat_template(tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from megaloom.eval.generate import chat_messages, chat_prompt
    from megaloom.interop.load import tokenizer_of

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = make_tiny_hf(tmp_path / "llama", "llama")
    theirs, ours = AutoTokenizer.from_pretrained(path), tokenizer_of(path, None)
    for message, system in [("hello", None), ("def f(): <|im_end|> ünï", "You are terse.")]:
        expected = theirs.apply_chat_template(chat_messages(message, system), add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
        assert chat_prompt(ours, message, system) == expected
    assert main(["generate", str(path), "--chat", "hi", "--system", "terse", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_bad_input_is_one_line(tiny_corpus, tmp_path, capsys):
    from megaloom.errors import ConfigError
    from megaloom.eval.tasks import read_choice_items

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "q", "choices": ["a"], "answer": 0}\n{"context": "q", "choices": ["a"], "answer": 3}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected .*\"answer\": 3"):
        read_choice_items([str(bad)])
    assert main(["eval", str(tmp_path / "nothing"), "--task", "choice", "--data", str(bad)]) == 2
    assert "nothing' does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--task", "choice", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "--data " + str(tmp_path / "missing.jsonl") + ": no such file" in capsys.readouterr().err
    assert main(["train", "configs/debug.toml", *corpus_args(tiny_corpus), "--set", "train.steps=1",
                 "--set", 'train.eval_tasks=["--task choice"]']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.eval_tasks[0]" in err and "--data" in err
    assert main(["generate", str(tmp_path), "--system", "x"]) == 2
    assert "--system sets the system message" in capsys.readouterr().err
