"""Small line plots for the report, rendered to PNG bytes with matplotlib's Agg canvas.

matplotlib is imported inside the functions (``import heed.report`` stays light), and only
``Figure`` + ``FigureCanvasAgg`` are used: no pyplot, no global backend switch, so making a
report never disturbs an interactive session.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

# Colour-blind-safe palette (Okabe-Ito), one colour per run across every plot.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


@dataclass
class Line:
    """One curve: ``label`` is the legend text; ``dashed`` marks eval-split points."""

    label: str
    steps: Sequence[float]
    values: Sequence[float]
    color: str
    dashed: bool = False
    alarm_steps: Sequence[tuple[float, str]] = field(default_factory=tuple)  # (step, alarm kind)


def _smooth(values: Sequence[float], k: int) -> list[float]:
    """Trailing mean over ``k`` points (the first points average what exists)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def line_plot(
    title: str, lines: Sequence[Line], ylabel: str = "", width: float = 4.4, height: float = 2.7
) -> bytes:
    """PNG bytes of one panel with a line per run; long noisy curves get a faint raw line
    under a trailing-mean line; alarm steps are marked with a red dotted line named by its kind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for line in lines:
        if not line.steps:
            continue
        style = "--" if line.dashed else "-"
        few = len(line.steps) <= 25
        if len(line.steps) > 60:
            k = max(2, len(line.steps) // 30)
            ax.plot(line.steps, line.values, style, color=line.color, alpha=0.25, linewidth=0.8)
            ax.plot(
                line.steps, _smooth(line.values, k), style, color=line.color, linewidth=1.8, label=line.label
            )
        else:
            ax.plot(
                line.steps,
                line.values,
                style,
                color=line.color,
                linewidth=1.8,
                marker="o" if few else None,
                markersize=3,
                label=line.label,
            )
        for step, kind in line.alarm_steps:
            ax.axvline(step, color="#C62828", linestyle=":", linewidth=1.2, alpha=0.8)
            ax.annotate(
                kind,
                xy=(step, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                rotation=90,
                va="top",
                fontsize=6,
                color="#C62828",
            )
    ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
    ax.set_xlabel("step", fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if len(lines) > 1 or any(line.dashed for line in lines):
        ax.legend(fontsize=7, frameon=False, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@dataclass
class Marker:
    """One labelled point of a scatter plot."""

    label: str
    x: float
    y: float
    color: str


def frontier_plot(
    title: str,
    markers: Sequence[Marker],
    curve: Sequence[tuple[float, float, str]],
    xlabel: str,
    ylabel: str,
    width: float = 6.4,
    height: float = 4.0,
) -> bytes:
    """PNG bytes of a score-vs-KL panel: ``curve`` (x, y, label) as a grey reference line with its
    points named (best-of-N), each marker a coloured point named by its label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if curve:
        xs, ys = [c[0] for c in curve], [c[1] for c in curve]
        ax.plot(
            xs,
            ys,
            "-",
            color="#777777",
            linewidth=1.6,
            marker="s",
            markersize=4,
            label="best-of-N (reference)",
        )
        for x, y, label in curve:
            ax.annotate(
                label, (x, y), xytext=(3, -9), textcoords="offset points", fontsize=7, color="#555555"
            )
    for m in markers:
        ax.plot([m.x], [m.y], "o", color=m.color, markersize=7)
        ax.annotate(m.label, (m.x, m.y), xytext=(4, 3), textcoords="offset points", fontsize=7, color=m.color)
    ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if curve:
        ax.legend(fontsize=7, frameon=False, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
