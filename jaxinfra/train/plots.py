"""PNG plots of a run's metrics.jsonl: loss, held-out bits per byte, learning rate, sparsity.

matplotlib is imported only when a plot is drawn, and through its Agg canvas alone (no pyplot), so
plotting neither needs a display nor changes any process-wide backend.
"""
from __future__ import annotations

import io
import json
import math
from typing import Any

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError

PANELS = (("loss", "training loss"), ("eval_bpb", "held-out bits per byte"), ("learning_rate", "learning rate"),
          ("sparsity", "sparsity"))


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The rows of `<run_dir>/metrics.jsonl` (a torn last line is skipped); UserError if there are none."""
    storage.check(run_dir, "run folder")
    storage.reachable(run_dir, "run folder")
    if not storage.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run folder")
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.isfile(path):
        raise UserError(f"{path}: no such file (is {run_dir} a run folder?)")
    rows = []
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a process killed mid-write leaves a torn line
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: holds no metrics rows")
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, by step; a step logged twice keeps its last value."""
    by_step = {int(r["step"]): float(r[key]) for r in rows
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def new_figure(n_panels: int) -> tuple[Any, list[Any]]:
    """A figure of n panels (2 x 2 for four) on matplotlib's Agg canvas."""
    # matplotlib (a second to import) only when a figure is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    cols = 2 if n_panels == 4 else n_panels
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(5.5 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def save_png(fig: Any, out: str) -> str:
    """Write the figure as a PNG at `out` (whole or not at all); returns the path."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    storage.write_bytes(out, png.getvalue())  # whole or not at all, on a disk or a store
    return out


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Write `<run_dir>/plots.png` (or `out`): the run's metrics over the steps; returns the path."""
    rows = read_metrics(run_dir)
    panels = [(k, t) for k, t in PANELS if k != "sparsity" or series(rows, k)[0]]  # sparsity only when pruning
    fig, axes = new_figure(len(panels))
    for ax, (key, title) in zip(axes, panels):
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(storage.basename(storage.absolute(run_dir)))
    return save_png(fig, out or storage.join(run_dir, "plots.png"))
