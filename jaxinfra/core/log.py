"""The library's console lines: each module logs to its own logger under `jaxinfra`, and `console` is the one
place that decides who prints them: process 0 only, through one handler, unless the caller configured logging."""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm

ROOT = "jaxinfra"  # every module's logger (logging.getLogger(__name__)) is a child of this one
_SILENT = logging.CRITICAL + 1  # above every level: no record is even created


class _Console(logging.Handler):
    """Each record as one plain line on stdout, written by tqdm so a progress bar on the terminal stays whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)  # sys.stdout at the time of the record (captures)
            sys.stdout.flush()  # as logging.StreamHandler does: a piped log (SLURM's, tail -f) shows each line now
        except Exception:  # noqa: BLE001 (logging's own rule: a failing handler reports, never raises)
            self.handleError(record)


def _configured_by_caller(root: logging.Logger) -> bool:
    """Whether the caller asked for INFO records and gave them somewhere to go (logging.basicConfig(level=INFO),
    dictConfig). A handler alone is no such choice: importing orbax or grain adds a stderr handler to the root
    logger, at its default level WARNING, whatever the caller wants."""
    return root.level <= logging.INFO and bool(root.handlers)


def console(lead: bool) -> None:
    """Route the library's INFO lines: process 0's to stdout (one handler, installed once, or the caller's own
    logging configuration), the other processes' nowhere, so a line is printed once per run."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(logging.INFO if lead else _SILENT)
    if _configured_by_caller(logging.getLogger()):
        logger.propagate = True
        return
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())
    logger.propagate = False  # not also through the root logger's handlers: a line is printed once
