"""Console output: a header, a live progress bar (rich), a summary with samples."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None, console: RichConsole):
        self._progress, self._task, self._console = progress, task, console

    def update(self, step: int, row: dict) -> None:
        text = f"loss {row['loss']:.4f}"
        if row.get("val_loss") is not None:
            text += f"  val {row['val_loss']:.4f}"
        text += f"  {row['tokens_per_s']:,.0f} tok/s"
        if row.get("mfu") is not None:
            text += f"  MFU {100 * row['mfu']:.1f}%"
        if self._progress is None:
            self._console.print(f"step {step}: {text}")
        else:
            self._progress.update(self._task, completed=step, stats=text)


class Console:
    """All terminal output of a run goes through here (rich on a terminal, plain lines otherwise)."""

    def __init__(self, quiet: bool = False):
        self.rich = RichConsole(file=sys.stdout, quiet=quiet, highlight=False)

    def print(self, *args: object) -> None:
        self.rich.print(*args, soft_wrap=True)  # one message, one line in a log file, however long

    def header(self, items: list[tuple[str, str]]) -> None:
        for key, value in items:
            self.rich.print(f"[bold]{key:>8}[/bold]  {value}")

    @contextlib.contextmanager
    def progress(self, total: int, enabled: bool = True) -> Iterator[_Bar]:
        if not enabled or not self.rich.is_terminal:
            yield _Bar(None, None, self.rich)
            return
        columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"))
        with Progress(*columns, console=self.rich) as progress:
            task = progress.add_task("train", total=total, stats="")
            yield _Bar(progress, task, self.rich)

    @contextlib.contextmanager
    def counter(self, label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
        """A bar over `total` items (evaluation requests): yields `advance(n)`. Plain output (a log
        file, or disabled) prints nothing until the caller's own summary."""
        if not enabled or not self.rich.is_terminal:
            yield lambda n: None
            return
        columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=self.rich, transient=True) as progress:
            task = progress.add_task(label, total=total)
            yield lambda n: progress.advance(task, n)

    def summary(self, run_dir: Path, first: float, final: float, val: float, ckpt: Path, samples: list[str],
                first_step: int = 1) -> None:
        self.rich.print(f"[bold]done[/bold]  loss {first:.4f} (step {first_step}) -> {final:.4f}, validation {val:.4f}")
        self.rich.print(f"  checkpoint {ckpt}\n  metrics    {run_dir / 'metrics.jsonl'}\n"
                        f"  plot       {run_dir / 'loss.png'}\n  tensorboard --logdir {run_dir / 'tb'}")
        for i, text in enumerate(samples):
            self.rich.rule(f"sample {i + 1}")
            self.rich.print(text, markup=False)
