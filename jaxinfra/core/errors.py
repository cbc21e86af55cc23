"""The exception types scripts turn into one line: a user's mistake (exit 2) or a run that failed
for a reason outside its input (exit 1): divergence, a full disk, a file removed underneath it."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator


class UserError(ValueError):
    """A bad config, CLI argument, data path or checkpoint: reported as one line, exit status 2."""


class Failed(RuntimeError):
    """The run could not go on (a save or an export failed): one line, exit status 1."""


class Diverged(Failed):
    """The loss, the parameters or the optimizer state became NaN or Inf (exit status 1, not a user error)."""


def one_line(cause: BaseException, limit: int = 300) -> str:
    """An exception's text as one short line: no tensorstore specs, no reprs of bound methods."""
    text = " ".join(str(cause).split())
    text = re.sub(r"\s*\[tensorstore_spec=.*?\]'?\)?$", "", text)
    text = re.sub(r"<bound method [^>]*>", "", text).strip() or type(cause).__name__
    if len(text) <= limit:
        return text
    # the head says what failed, the tail the innermost cause (tensorstore ends with e.g. "No space left on
    # device"): a message cut at its end alone lost the cause whenever a long path came first
    head, tail = text[:limit // 2].rsplit(" ", 1)[0], text[-(limit // 2):].split(" ", 1)[-1]
    return f"{head} ... {tail}"


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """An OSError raised by writes to an open file (which carry no file name) names `path`."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise
