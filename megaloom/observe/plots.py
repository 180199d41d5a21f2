"""Loss curves from a run directory to PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from megaloom.observe.metrics import read_metrics


def plot_loss(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        label = Path(run_dir).name
        if train:
            line, = ax.plot(*zip(*train), label=f"{label} train")
            if val:
                ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
