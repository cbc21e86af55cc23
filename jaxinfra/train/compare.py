"""A dense run beside a pruned one: size, speed and quality side by side, and a PNG of both runs' loss
and sparsity over the steps."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.train.plots import new_figure, read_metrics, save_png, series


@dataclass
class RunFigures:
    """What compare reports of one run."""

    run_dir: str
    source: str  # where the tensors were read: "checkpoint N" or "export N" (exports/model-N.safetensors)
    params: int
    nonzeros: int
    dense_bytes: int
    sparse_bytes: int
    eval_loss: float | None
    eval_bpb: float | None
    step_time_s: float | None
    rows: list[dict[str, Any]]


def median_step_time(rows: list[dict[str, Any]]) -> float | None:
    """Median `step_time_s` of the logged steps, without the first tenth of them (at least the first:
    it carries the pipeline's warm-up)."""
    _, times = series(rows, "step_time_s")
    if len(times) > 1:
        times = times[max(1, len(times) // 10):]
    return statistics.median(times) if times else None


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    """The value of `key` at the highest step that logged it."""
    _, values = series(rows, key)
    return values[-1] if values else None


def run_figures(run_dir: str) -> RunFigures:
    """Figures of one run folder: tensors from its newest checkpoint (else its newest export), the rest
    from metrics.jsonl."""
    # imported here: the command line's start-up reads metrics.jsonl before JAX and Orbax load
    from jaxinfra.ckpt import reader as ckpt_reader
    from jaxinfra.export import safetensors as safetensors_lib
    from jaxinfra.export import sparse_writer
    from jaxinfra.export import writer as ex
    rows = read_metrics(run_dir)
    if ckpt_reader.has_steps(run_dir):
        step_dir, step = ckpt_reader.locate(run_dir)
        _, tensors = ckpt_reader.iter_params(step_dir)
        summary = sparse_writer.summarize(tensors, sparse_writer.saved_pattern(step_dir), ex.base_metadata(step))
        source = f"checkpoint {step}"
    elif (found := ex.newest_export(run_dir)) is not None:
        path, step = found
        summary = sparse_writer.summarize(safetensors_lib.iter_file(path), None, ex.base_metadata(step))
        source = f"export {step}"
    else:
        raise UserError(f"{run_dir}: holds no complete checkpoint step and no exports/model-<step>.safetensors")
    return RunFigures(run_dir, source, summary.params, summary.nonzeros, summary.dense_bytes, summary.sparse_bytes,
                      _last(rows, "eval_loss"), _last(rows, "eval_bpb"), median_step_time(rows), rows)


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(dense: RunFigures, pruned: RunFigures) -> list[str]:
    """The side-by-side lines: label, dense, pruned, pruned / dense."""
    lines = [f"{'':<24}{'dense':>18}{'pruned':>18}{'pruned/dense':>14}",
             f"{'run folder':<24}{os.path.basename(os.path.abspath(dense.run_dir)):>18}"
             f"{os.path.basename(os.path.abspath(pruned.run_dir)):>18}",
             f"{'tensors from':<24}{dense.source:>18}{pruned.source:>18}"]
    for label, key, spec in (("parameters", "params", ",d"), ("nonzeros", "nonzeros", ",d"),
                             ("dense file (bytes)", "dense_bytes", ",d"), ("sparse file (bytes)", "sparse_bytes", ",d"),
                             ("final eval loss", "eval_loss", ".4f"), ("final bits per byte", "eval_bpb", ".4f"),
                             ("median step time (s)", "step_time_s", ".4f")):
        a, b = getattr(dense, key), getattr(pruned, key)
        ratio = f"{b / a:.3f}" if a and b is not None else "-"
        lines.append(f"{label:<24}{_fmt(a, spec):>18}{_fmt(b, spec):>18}{ratio:>14}")
    return lines


def plot(dense: RunFigures, pruned: RunFigures, out: str) -> str:
    """A PNG of training loss and sparsity over the steps of both runs; returns its path."""
    fig, (loss_ax, sparsity_ax) = new_figure(2)
    for run, label in ((dense, "dense"), (pruned, "pruned")):
        name = f"{label}: {os.path.basename(os.path.abspath(run.run_dir))}"
        loss_ax.plot(*series(run.rows, "loss"), label=name)
        steps, values = series(run.rows, "sparsity")
        sparsity_ax.plot(steps, values, label=name if steps else f"{name} (not logged)")
    for ax, title in ((loss_ax, "training loss"), (sparsity_ax, "sparsity")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_png(fig, out)


def compare(dense_dir: str, pruned_dir: str, out: str | None = None) -> tuple[list[str], str]:
    """(table lines, PNG path) for a dense and a pruned run; the PNG goes to `<pruned_dir>/compare.png`
    unless `out` is given."""
    for d in (dense_dir, pruned_dir):  # both named before any slow reading
        read_metrics(d)  # names a missing folder or bucket
    dense, pruned = run_figures(dense_dir), run_figures(pruned_dir)
    return table(dense, pruned), plot(dense, pruned, out or storage.join(pruned_dir, "compare.png"))
