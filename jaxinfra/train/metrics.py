"""Step metrics on the host: fetched one step late, timed and reported (the Reporter), and where
they go (metrics.jsonl, TensorBoard event files, and a progress bar on a terminal or one plain
line per logged step when stdout is a file: CI and SLURM logs get lines, not carriage returns)."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
from tqdm import tqdm

from jaxinfra.core.errors import Diverged, naming

log = logging.getLogger(__name__)


def _strict(value: Any) -> Any:
    """A value strict JSON can hold: a NaN or infinite float becomes null (metrics.jsonl stays strict)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _step_of(line: str) -> float:
    """A row's step; a torn last line (a process killed mid-write) sorts past every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


METRICS = "metrics.jsonl"  # in the run folder: one JSON row per logged step

class MetricsWriter:
    """Writes rows from process 0 only; other processes keep quiet."""

    def __init__(self, run_dir: str, total_steps: int, *, enabled: bool = True, progress: bool = True,
                 tensorboard: bool = True):
        self.run_dir, self.total_steps, self.enabled = run_dir, total_steps, enabled
        self.progress_on, self.tensorboard = progress, tensorboard
        self._jsonl = self._tb = self._bar = None
        self._lines = False  # progress as plain lines (stdout is not a terminal)

    def open(self, initial_step: int = 0) -> MetricsWriter:
        """Start writing at `initial_step`: a resumed run's rows past it are dropped (they are redone)."""
        if not self.enabled:
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, METRICS)
        kept = []
        if initial_step and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if _step_of(line) <= initial_step]
        self._jsonl = open(path, "w")
        self._jsonl.writelines(kept)
        if self.tensorboard:
            # tensorboardX loads slowly, and only an opened writer needs it
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        self._lines = self.progress_on and not sys.stdout.isatty()
        if self.progress_on and not self._lines:
            self._bar = tqdm(total=self.total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             mininterval=1.0)
        return self

    def write(self, step: int, row: dict[str, Any]) -> None:
        """One JSON line (and TensorBoard scalars) for a step."""
        if not self.enabled:
            return
        with naming(self._jsonl.name):
            self._jsonl.write(json.dumps({"step": step, **{k: _strict(v) for k, v in row.items()}},
                                         allow_nan=False) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            with naming(self._tb.logdir):
                for key, value in row.items():
                    if isinstance(value, (int, float)):
                        self._tb.add_scalar(key, value, step)

    def progress(self, step: int, logged: bool = True, **postfix: str) -> None:
        """Move the bar to `step` and show the latest figures (without a terminal: a line when `logged`)."""
        if self._lines and logged:
            log.info(f"step {step}/{self.total_steps}: " + ", ".join(f"{k} {v}" for k, v in postfix.items()))
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(postfix, refresh=False)

    def flush(self) -> None:
        """Put what was written on disk (before the run folder's files are uploaded)."""
        if self._tb is not None:
            with naming(self._tb.logdir):
                self._tb.flush()

    def close(self) -> None:
        """Flush and close everything."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            with naming(self._tb.logdir):
                self._tb.close()
        if self._jsonl is not None:
            with naming(self._jsonl.name):
                self._jsonl.close()


class Reporter:
    """Owns the host side of each step's metrics: fetched one step late (so the device never waits),
    timed, written every `log_every` steps and at `last_step`, shown on the progress bar, with MFU
    when the model's FLOPs are known; `final` holds the run's latest figures."""

    def __init__(self, writer: MetricsWriter | None, *, log_every: int, last_step: int, tokens_per_step: int,
                 tokens_per_example: int = 1, flops_per_token: float = 0.0, peak_flops: float = 0.0):
        self.writer, self.log_every, self.last_step = writer, log_every, last_step
        self.tokens_per_step, self.tokens_per_example = tokens_per_step, tokens_per_example
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.unit = "tok_s" if tokens_per_example > 1 else "ex_s"
        self.final: dict[str, Any] = {}
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._clock = time.perf_counter()

    def dispatched(self, step: int, metrics: dict[str, Any]) -> None:
        """Step `step` was just dispatched: fetch the previous step's metrics (done by now, or nearly)."""
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        """Fetch and report the pending step; raises Diverged if its loss is not finite."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if not math.isfinite(values["loss"]):
            raise Diverged(f"loss became {values['loss']} at step {step}; lower optim.lr or check the data")
        if not math.isfinite(values.get("grad_norm", 0.0)):
            raise Diverged(f"gradient norm became {values['grad_norm']} at step {step} (the loss was "
                           f"{values['loss']:.4g}); scale the loss down, or set optim.clip_norm")
        values["step_time_s"] = now - self._clock
        values["tokens_per_sec"] = self.tokens_per_step / max(now - self._clock, 1e-9)
        self._clock = now
        values["examples_per_sec"] = values["tokens_per_sec"] / self.tokens_per_example
        if self.flops_per_token and self.peak_flops:
            values["mfu"] = self.flops_per_token * values["tokens_per_sec"] / self.peak_flops
        self.final.update(loss=values["loss"], step=step)
        if self.writer is None:
            return
        logged = step % self.log_every == 0 or step == self.last_step
        if logged:
            self.writer.write(step, values)
        shown = {"loss": f"{values['loss']:.3f}", self.unit: f"{values['tokens_per_sec']:,.0f}"}
        if "mfu" in values:
            shown["mfu"] = f"{values['mfu']:.1%}"
        self.writer.progress(step, logged, **shown)

    def evaluated(self, step: int, row: dict[str, float]) -> None:
        """An evaluation after `step` (its time is not step time): written, printed, kept in `final`."""
        self.flush()
        if row:
            self.final.update(row)
            if self.writer is not None:
                self.writer.write(step, row)
                log.info(f"step {step}: eval " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in row.items()))
        self._clock = time.perf_counter()
