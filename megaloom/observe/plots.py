"""Loss curves from a run directory to PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from megaloom.errors import ConfigError
from megaloom.observe.metrics import read_metrics


def plot_loss(run_dirs: list[Path], out: Path, metric: str = "loss") -> Path:
    """Curves of `metric` (a metrics.jsonl field: loss, or e.g. GRPO's reward) per step for each run, with
    its validation value (`val_<metric>`) as points where the run has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        train = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
        val = [(r["step"], r[f"val_{metric}"]) for r in rows if r.get(f"val_{metric}") is not None]
        if rows and not train and not val:
            fields = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
            raise ConfigError(f"--metric {metric}: no row of {run_dir}/metrics.jsonl has it; its numeric fields "
                             f"are {', '.join(fields)}")
        label = Path(run_dir).name
        if train:
            line, = ax.plot(*zip(*train), label=f"{label} train")
            if val:
                ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)" if metric == "loss" else metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
