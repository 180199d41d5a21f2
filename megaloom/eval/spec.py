"""What an evaluation is: the task flags of `megaloom eval`, which are also the item format of
`train.eval_tasks`, so that a task means the same thing on the command line and in a config. Light
(argparse only): the command-line parser imports it."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path

from megaloom.errors import ConfigError

TASKS = ("perplexity", "choice")


@dataclass
class TaskSpec:
    """One evaluation: what `megaloom eval ... --task ...` and an item of `train.eval_tasks` say."""

    task: str
    data: list[str]
    max_length: int = 0  # 0 = the model's context
    fewshot: int = 0
    batch_size: int = 16
    name: str = ""  # the metrics prefix; default the first file's name without suffix, e.g. "wiki"

    @property
    def label(self) -> str:
        return self.name or Path(self.data[0]).stem


def add_task_args(p: argparse.ArgumentParser) -> None:
    """The flags that describe a task (shared by `megaloom eval` and `train.eval_tasks`)."""
    p.add_argument("--task", choices=TASKS, required=True, help="perplexity: rolling log-likelihood of text files; "
                   "choice: multiple-choice accuracy on a JSONL file")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="perplexity: text files (one document each) or .jsonl files with a \"text\" field per line; "
                        "choice: .jsonl files of {\"context\": str, \"choices\": [str, ...], \"answer\": int}")
    p.add_argument("--max-length", type=int, default=0, metavar="N",
                   help="tokens of context per window (default: the model's context length)")
    p.add_argument("--fewshot", type=int, default=0, metavar="K", help="choice: solved examples before each item, "
                   "drawn with a fixed seed from the same file, never the item itself")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="rows per forward micro-batch")
    p.add_argument("--name", default="", help="name of the results in metrics.jsonl: eval/NAME/METRIC "
                   "(default: the first file's stem)")


def spec_from_args(args: argparse.Namespace) -> TaskSpec:
    spec = TaskSpec(args.task, list(args.data), args.max_length, args.fewshot, args.batch_size, args.name)
    check_spec(spec)
    return spec


def parse_task(text: str, key: str = "train.eval_tasks") -> TaskSpec:
    """An item of `train.eval_tasks`: the task flags of `megaloom eval` in one string, e.g.
    "--task choice --data arc.jsonl --fewshot 5". A bad item is one ConfigError line."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # noqa: ANN202 - argparse would print usage and exit
            raise ConfigError(f"{key} item {text!r}: {message}; write it as megaloom eval's task flags, "
                              "e.g. \"--task choice --data arc.jsonl --fewshot 5\"")

    p = Parser(prog=key, add_help=False)
    add_task_args(p)
    try:
        args = p.parse_args(shlex.split(text))
    except ValueError as e:  # shlex: an unclosed quote
        raise ConfigError(f"{key} item {text!r}: {e}") from None
    return spec_from_args(args)


def check_spec(spec: TaskSpec) -> None:
    for path in spec.data:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--data {path}: no such file")
    if spec.max_length < 0 or spec.fewshot < 0 or spec.batch_size < 1:
        raise ConfigError(f"--max-length ({spec.max_length}) and --fewshot ({spec.fewshot}) must not be negative, "
                          f"--batch-size ({spec.batch_size}) must be positive")
    if spec.fewshot and spec.task != "choice":
        raise ConfigError(f"--fewshot {spec.fewshot} applies to --task choice only")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """`megaloom eval`'s arguments: MODEL, the task flags, the layout and the output."""
    p.add_argument("model", metavar="MODEL", help="run directory, checkpoint, Hugging Face model directory or .gguf file")
    add_task_args(p)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (under torchrun); "
                   "the remaining processes split the documents (data parallel)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="compute precision")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--details", metavar="FILE", help="also write per-document / per-item scores to this JSON file")
    p.add_argument("--no-log", action="store_true", help="do not append the results to the run's metrics.jsonl")
