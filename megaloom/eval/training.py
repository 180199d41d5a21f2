"""`train.eval_tasks`: the evaluations of `megaloom eval` run inside training, at every validation.

The trainer knows nothing of evaluation (it sits below it); the command line builds these from the
config and hands them to `Trainer(evals=...)`. Each runs on the model exactly as training holds it (any
layout, ZeRO included, the pipeline through the trainer's own runner) and returns the row's
`eval/NAME/METRIC` entries, the same keys `megaloom eval` appends for a run.
"""

from __future__ import annotations

from typing import Any

from megaloom.config import Config
from megaloom.eval.score import Scorer
from megaloom.eval.spec import TaskSpec, parse_task
from megaloom.eval.tasks import TaskResult, run_task


def metrics_row(result: TaskResult, prefix: str = "eval") -> dict[str, float]:
    """Flat keys `eval/<name>/<metric>`: TensorBoard groups them, metrics.jsonl keeps one row per step."""
    return {f"{prefix}/{result.spec.label}/{k}": v for k, v in result.metrics.items()}


class TrainingEval:
    """One item of train.eval_tasks, called by the trainer with itself."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec

    def __call__(self, trainer: Any) -> dict[str, float]:
        cfg = trainer.cfg
        tp = trainer.tp
        multiple = tp.size if tp is not None and tp.sequence_parallel else 1  # sequence-parallel lengths split over tp
        scorer = Scorer(trainer.model, trainer.runner, trainer.grid, trainer.device, cfg.model.seq_len,
                        cfg.train.precision, multiple)
        return metrics_row(run_task(self.spec, scorer, trainer.tokenizer))


def training_evals(cfg: Config) -> list[TrainingEval]:
    """The evaluations of train.eval_tasks, checked (flags, files) before training starts."""
    return [TrainingEval(parse_task(item, f"train.eval_tasks[{i}]")) for i, item in enumerate(cfg.train.eval_tasks)]
