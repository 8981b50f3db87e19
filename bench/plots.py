"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

Two shapes cover every measure: lines of y against x (TTFT vs prompt length, tok/s vs batch) and
grouped bars (a baseline beside what it is compared with).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

DPI = 100


def line_plot(path: Path, title: str, xlabel: str, ylabel: str,
              series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
              log_x: bool = False, log_y: bool = False) -> Path:
    """One line with markers per series: {label: (xs, ys)}."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    if log_y:
        ax.set_yscale("log")
    return _finish(fig, ax, path, title, xlabel, ylabel)


def bar_plot(path: Path, title: str, ylabel: str, groups: Sequence[str],
             bars: Mapping[str, Sequence[float]]) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per key of `bars` in each group."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(1, len(bars))
    for i, (label, values) in enumerate(bars.items()):
        offsets = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        rects = ax.bar(offsets, values, width, label=label)
        ax.bar_label(rects, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    return _finish(fig, ax, path, title, "", ylabel)


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
