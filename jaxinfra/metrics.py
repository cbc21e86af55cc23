"""Where metrics go: metrics.jsonl, TensorBoard event files and a console progress bar."""
from __future__ import annotations

import json
import os
from typing import Any

from tqdm import tqdm


def _step_of(line: str) -> float:
    """A row's step; a torn last line (a process killed mid-write) sorts past every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class MetricsWriter:
    """Writes rows from process 0 only; other processes keep quiet."""

    def __init__(self, run_dir: str, total_steps: int, *, initial_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        kept = []
        if initial_step and os.path.exists(path):  # a resumed run: rows past the restored step are redone
            with open(path) as f:
                kept = [line for line in f if _step_of(line) <= initial_step]
        self._jsonl = open(path, "w")
        self._jsonl.writelines(kept)
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported here: optional at import time of the package
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             mininterval=1.0)

    def write(self, step: int, row: dict[str, Any]) -> None:
        """One JSON line (and TensorBoard scalars) for a step."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def progress(self, step: int, **postfix: str) -> None:
        """Move the bar to `step` and show the latest figures."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(postfix, refresh=False)

    def print(self, line: str) -> None:
        """A console line that does not break the progress bar."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(line)

    def close(self) -> None:
        """Flush and close everything."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
