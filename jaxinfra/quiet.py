"""Gloo's connection lines out of a multi-process run's output.

Gloo, JAX's CPU collectives across processes, prints "[Gloo] Rank i is connected to j peer ranks.
Expected number of connected peer ranks is : j" from C++ for every communicator it opens: dozens of
lines per run that bury the run's own. A child process (this file, run as a script: it imports nothing
of jaxinfra) reads the run's stdout and stderr through pipes and passes every other line on. A child,
not a thread, so what the run wrote still comes out when it is killed.
"""
from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading

# Communicators connect on several threads at once, so their pieces interleave ("[Gloo] Rank [Gloo]
# Rank 01 is connected to ..."): a line made only of these pieces and the numbers between is dropped.
PIECES = re.compile(rb"\[Gloo\] Rank | is connected to | peer ranks\. |Expected number of connected peer ranks is : ")


# Another write can also land inside a message (both streams share one pipe when they go to one file, as
# under srun): "[Gloo] Rank 1 is conne" + "resumed from step 25\n" + "cted to 1 peer ranks. ... : 1\n".
# The message's start leading a line, and a line that is only its end, are cut out (measured: one such
# split leaked "cted to 1 peer ranks. ..." into a SLURM job's log).
MESSAGE = b"[Gloo] Rank # is connected to # peer ranks. Expected number of connected peer ranks is : #"


def _any_of(parts: list[bytes]) -> bytes:
    """Alternatives, longest first (a regex takes the first that matches); # stands for a number."""
    return b"|".join(re.escape(p).replace(b"\\#", rb"\d+").replace(b"#", rb"\d+")
                     for p in sorted(set(parts), key=len, reverse=True))


HEAD = re.compile(b"^(?:" + _any_of([MESSAGE[:i] for i in range(len(b"[Gloo] "), len(MESSAGE))]) + b")(?=.)")
TAIL = re.compile(b"^(?:" + _any_of([MESSAGE[i:] for i in range(1, len(MESSAGE) - 12)]) + rb")\s*$")


def chatter(line: bytes) -> bool:
    """Whether a line holds nothing but pieces of Gloo's connection message (or its cut-off end)."""
    if TAIL.match(line):
        return True
    return PIECES.search(line) is not None and not PIECES.sub(b"", line).translate(None, b"0123456789 \r\n")


def clean(line: bytes) -> bytes | None:
    """The line to pass on: None for Gloo's chatter, else the line without a message's start leading it."""
    return None if chatter(line) else HEAD.sub(b"", line, count=1)


def quiet_collectives() -> bool:
    """Filter this process's stdout and stderr from here on (one pipe when both go to one file, so their
    order is kept); at exit the original descriptors come back and the filter is reaped. Returns
    whether the filter runs (False where no child process can start: output stays as it was)."""
    sys.stdout.flush()
    sys.stderr.flush()
    same = os.path.sameopenfile(1, 2)
    fds = (1,) if same else (1, 2)
    pipes = {fd: os.pipe() for fd in fds}
    try:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *(f"{r}:{fd}" for fd, (r, _) in pipes.items())],
                                 pass_fds=[r for r, _ in pipes.values()], stdin=subprocess.DEVNULL)
    except OSError:
        for r, w in pipes.values():
            os.close(r)
            os.close(w)
        return False
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    for fd, (r, w) in pipes.items():
        os.close(r)
        os.dup2(w, fd)
        if same:
            os.dup2(w, 2)
        os.close(w)
    atexit.register(_restore, child, saved)
    return True


def _restore(child: subprocess.Popen, saved: dict[int, int]) -> None:
    """At exit: the original stdout and stderr back (later output, such as other exit handlers' and
    teardown errors, goes straight there), then the filter reaped once it has passed on the rest."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, original in saved.items():
        os.dup2(original, fd)
        os.close(original)
    try:
        child.wait(timeout=10)  # EOF once every holder of the pipes (this process's children too) closed it
    except subprocess.TimeoutExpired:
        pass


def _copy(src: int, dst: int) -> None:
    with os.fdopen(src, "rb") as lines:  # buffered: a line is passed on as soon as it is complete
        for line in lines:
            line = clean(line)
            if line is None:
                continue
            while line:  # a pipe may take part of a long line
                line = line[os.write(dst, line):]


if __name__ == "__main__":
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a launcher's signals are for the run
        signal.signal(s, signal.SIG_IGN)  # (SLURM signals every process of a task): drain to EOF
    threads = [threading.Thread(target=_copy, args=tuple(map(int, pair.split(":")))) for pair in sys.argv[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
