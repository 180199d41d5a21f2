"""Pictures of a simulated pipeline schedule: a PNG like Figure 4 of Narayanan et al. 2021, and text.

One row per pipeline rank, time to the right, one box per forward or backward pass. White space is
the pipeline bubble of §2.2: the time a rank waits for its neighbours, what the schedules compete on.
"""

from __future__ import annotations

from fractions import Fraction
from functools import reduce
from math import ceil, gcd
from pathlib import Path

from megaloom.parallel.schedules import Action, Op, SimResult, Span

# Denominators a time grid may have: chunk costs are 1/v with v <= 8, p2p latencies of a few decimals.
_LCM = 2**4 * 3**2 * 5**3 * 7


def _label(a: Action, chunks: int) -> str:
    """"F3", or "1F3" (chunk, op, microbatch) when ranks hold several chunks, as in torch's notation."""
    return f"{a.chunk}{a.op.value}{a.microbatch}" if chunks > 1 else f"{a.op.value}{a.microbatch}"


def _fit(a: Action, chunks: int, n: int, long: bool) -> str:
    """The longest label that leaves a space in n characters; a long pass is padded with '-'."""
    if n == 1:
        return a.op.value
    label = next((t for t in (_label(a, chunks), f"{a.op.value}{a.microbatch}") if len(t) < n), a.op.value)
    return label.ljust(n - 1, "-" if long else " ") + " "


def _chars_per_time(spans: tuple[Span, ...], shortest: float, cell: int) -> float:
    """Characters per time unit: whole characters per grid step when the times share a coarse grid.

    Times are sums of the costs, so with costs such as F = 1, B = 2, p2p = 0.25 every start and end is a
    multiple of 0.25 and boxes land on exact characters; a fine grid (B = 2.13) would make every box
    very wide, so then the shortest pass gets `cell` characters and the rest are rounded.
    """
    times = [Fraction(t).limit_denominator(1000) for s in spans for t in (s.start, s.end)]
    grid = Fraction(reduce(gcd, (t.numerator * (_LCM // t.denominator) for t in times if _LCM % t.denominator == 0)),
                    _LCM)
    steps = shortest / grid if grid else 0  # grid steps in the shortest pass
    if not grid or steps > 2 * cell or any(_LCM % t.denominator for t in times):
        return cell / shortest
    return ceil(cell / steps) / float(grid)


def text_timeline(sim: SimResult, width: int | None = None) -> str:
    """One line per rank, '.' for idle; the shortest pass gets one cell, the rest scale with their cost.

    A cell is as wide as the longest label plus a space ("F0 ", "B12---- "), so with the paper's
    t_b = 2·t_f a backward spans two cells; non-integer costs (interleaved chunks take 1/v, p2p
    latency) are scaled the same way and rounded to whole characters. Given `width`, cells narrow
    (down to one character) to fit and labels are cut short.
    """
    spans, v = sim.spans, sim.schedule.chunks
    shortest = min(s.end - s.start for s in spans)
    prefix = len(f"rank {sim.schedule.pp - 1} |")
    cell = max(len(_label(s.action, v)) for s in spans) + 1
    if width is not None:
        cell = max(1, min(cell, int((width - prefix - 1) * shortest / sim.makespan)))
    scale = _chars_per_time(spans, shortest, cell)
    rows = [["."] * round(sim.makespan * scale) for _ in range(sim.schedule.pp)]
    for s in spans:
        a, b = round(s.start * scale), round(s.end * scale)
        if b > a:
            rows[s.rank][a:b] = _fit(s.action, v, b - a, s.end - s.start >= 1.5 * shortest)
    return "\n".join(f"{f'rank {r}':<{prefix - 2}} |{''.join(row)}|" for r, row in enumerate(rows))


def draw_timeline(sim: SimResult, out: Path, title: str | None = None) -> Path:
    """Write the schedule as a PNG: rank 0 on top, a coloured box per pass, idle time left white.

    Colour = microbatch (light for forward, dark for backward, hatched for the zero-bubble W);
    the edge style marks the chunk under interleaving.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched = sim.schedule
    p, v = sched.pp, sched.chunks
    fig, ax = plt.subplots(figsize=(min(18.0, max(7.0, 0.28 * sim.makespan)), 1.2 + 0.55 * p), dpi=120)
    for s in sim.spans:
        _box(ax, s, p)
    ax.set_xlim(0, sim.makespan)
    ax.set_ylim(-0.5, p - 0.5)
    ax.set_yticks(range(p), [f"rank {r}" for r in reversed(range(p))])
    ax.set_xlabel(f"time ({_cost_note(sim)})")
    head = f"{sched.name}: p = {p}, m = {sched.microbatches}, v = {v}; bubble {sim.bubble_fraction:.1%} of ideal time"
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=10)
    ax.legend(handles=_legend(sim), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _cost_note(sim: SimResult) -> str:
    """The costs the picture was simulated with, per microbatch and whole rank (a chunk takes 1/v)."""
    c, ops = sim.costs, {s.action.op for s in sim.spans}
    parts = [f"F = {c.forward:g}"]
    parts += [f"B = {c.backward:g}"] if Op.BACKWARD in ops else []
    parts += [f"I = {c.backward_input:g}", f"W = {c.backward_weight:g}"] if Op.BACKWARD_WEIGHT in ops else []
    parts += [f"p2p = {c.p2p:g}"] if c.p2p else []
    return ", ".join(parts) + " per microbatch" + (f", a chunk's pass takes 1/{sim.schedule.chunks}"
                                                   if sim.schedule.chunks > 1 else "")


_CHUNK_STYLES = ("solid", "dashed", "dotted", "dashdot")


def _colour(a: Action) -> tuple[float, ...]:
    """tab20 pairs a dark and a light shade of ten hues: the hue is the microbatch."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"]
    return tab20(2 * (a.microbatch % 10) + (1 if a.op is Op.FORWARD else 0))


def _box(ax, s: Span, p: int) -> None:  # noqa: ANN001 - matplotlib Axes
    a = s.action
    y = p - 1 - s.rank
    ax.barh(y, s.end - s.start, left=s.start, height=0.8, color=_colour(a), edgecolor="black",
            linewidth=0.6 if a.chunk == 0 else 1.1, linestyle=_CHUNK_STYLES[a.chunk % len(_CHUNK_STYLES)],
            hatch="///" if a.op is Op.BACKWARD_WEIGHT else None)
    label = str(a.microbatch) if a.op in (Op.FORWARD, Op.BACKWARD) else f"{a.op.value}{a.microbatch}"
    ax.text((s.start + s.end) / 2, y, label, ha="center", va="center", fontsize=7,
            color="black" if a.op is Op.FORWARD else "white")


def _legend(sim: SimResult) -> list:
    from matplotlib.patches import Patch

    ops = {s.action.op for s in sim.spans}
    names = {Op.FORWARD: ("forward (light)", "0.85", None), Op.BACKWARD: ("backward (dark)", "0.35", None),
             Op.BACKWARD_INPUT: ("backward, input grad I", "0.35", None),
             Op.BACKWARD_WEIGHT: ("backward, weight grad W", "0.35", "///")}
    handles = [Patch(facecolor=c, edgecolor="black", hatch=h, label=n) for op, (n, c, h) in names.items() if op in ops]
    handles.append(Patch(facecolor="white", edgecolor="black", label="idle (bubble)"))
    handles += [Patch(facecolor="white", edgecolor="black", linestyle=_CHUNK_STYLES[c % len(_CHUNK_STYLES)],
                      label=f"chunk {c}") for c in range(sim.schedule.chunks) if sim.schedule.chunks > 1]
    handles.append(Patch(facecolor="none", edgecolor="none", label="colour = microbatch"))
    return handles
