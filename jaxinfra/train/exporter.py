"""Exports written beside the run off the train loop: each committed step merged into checkpoint.export_format."""
from __future__ import annotations

import threading
from typing import Callable

from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.core.errors import one_line
from jaxinfra.export.writer import export, export_path
from jaxinfra.hub.hf import export_hf


def _hf(directory: str, out: str, step: int, dtype: str | None) -> list[str]:
    return export_hf(directory, out, step=step, dtype=dtype, force=True)[:1]  # the folder (its files follow it)


def _safetensors(directory: str, out: str, step: int, dtype: str | None) -> list[str]:
    return export(directory, out, step=step, dtype=dtype, force=True)


# settings' EXPORT_FORMATS -> the writer of one step: (checkpoints folder, out, step, dtype) -> paths written
WRITERS: dict[str, Callable[[str, str, int, str | None], list[str]]] = {"safetensors": _safetensors, "hf": _hf}


class BackgroundExporter:
    """Merges committed checkpoint steps into exports/model-<step>.safetensors off the train loop.

    `request(step)` after saving a step; `poll()` each step starts a writer thread once that step is
    committed; `drain()` (once the checkpoints are committed) writes what is left and joins.
    """

    def __init__(self, ckpt: ckpt_lib.Checkpointer, run_dir: str, dtype: str | None = None, enabled: bool = True,
                 fmt: str = "safetensors"):
        self.ckpt, self.run_dir, self.dtype, self.enabled, self.fmt = ckpt, run_dir, dtype, enabled, fmt
        self._pending: list[int] = []
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.written: list[str] = []

    @property
    def busy(self) -> bool:
        """Whether an export is waiting or being written."""
        return bool(self._pending or any(t.is_alive() for t in self._threads))

    def request(self, step: int) -> None:
        """Export `step` once its checkpoint is committed."""
        if self.enabled:
            self._pending.append(step)

    def _write(self, step: int) -> None:
        out = export_path(self.run_dir, step, self.fmt)
        try:
            self.written += WRITERS[self.fmt](self.ckpt.directory, out, step, self.dtype)
        except Exception as e:  # reported by the run's end, not lost in the thread
            self.errors.append(f"export of step {step} to {out} failed: {one_line(e)}")

    def poll(self) -> None:
        """Start a writer thread for each requested step that is now committed (a stat per pending step)."""
        for step in [s for s in self._pending if self.ckpt.committed(s)]:
            self._pending.remove(step)
            thread = threading.Thread(target=self._write, args=(step,), name=f"export-{step}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def drain(self) -> None:
        """Write every requested export now: call once the checkpoints are committed."""
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        for step in self._pending:
            self._write(step)
        self._pending.clear()
