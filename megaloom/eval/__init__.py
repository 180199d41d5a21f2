"""Evaluation with lm-evaluation-harness semantics, in any layout: perplexity over rolling windows and
multiple-choice accuracy (docs/eval.md). `requests` builds what the harness would score, `score` runs
it through the parallel model, `tasks` turns scores into the harness's metrics."""

from megaloom.eval.requests import ChoiceItem, HarnessEncoder, Request, rolling_token_windows
from megaloom.eval.score import Scorer
from megaloom.eval.spec import TaskSpec, parse_task
from megaloom.eval.tasks import TaskResult, run_task

__all__ = ["ChoiceItem", "HarnessEncoder", "Request", "Scorer", "TaskResult", "TaskSpec", "parse_task",
           "rolling_token_windows", "run_task"]
