"""One writer per run folder: a lock file created atomically (O_EXCL, which local disks and shared
filesystems honour alike; a conditional PUT on an object store) before a run writes anything,
naming its holder (host, pid, since when).

A lock whose holder is a dead process on this host is taken over with a printed line; one held on
another host cannot be checked from here, so the message says how to clear it. Readers (export,
inspect, generate, compare) never take it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError

log = logging.getLogger(__name__)

LOCK = ".jaxinfra.lock"  # in the run folder


def _alive(pid: int) -> bool:
    """Whether a process of this host still has that pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """The lock of one run folder, held from `acquire()` to `release()`."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = storage.join(run_dir, LOCK)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            found = json.loads(storage.read_text(self.path))
            return found if isinstance(found, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # torn or foreign: a holder we cannot name
            return {}

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the folder and the holder."""
        storage.makedirs(self.run_dir)
        for _ in range(3):  # a stale lock taken over, or a holder that released it meanwhile
            if not storage.create_exclusive(self.path, json.dumps(self.me).encode()):
                other = self._holder()
                if other is None:
                    continue
                host, pid, since = other.get("host", "?"), other.get("pid", "?"), other.get("since", "?")
                if host == self.me["host"] and isinstance(pid, int) and not _alive(pid):
                    log.info(f"taking over the lock of {self.run_dir}: its holder, process {pid} on {host} "
                        f"(since {since}), is gone")
                    storage.remove(self.path)
                    continue
                raise UserError(f"run.dir={self.run_dir} is in use by process {pid} on host {host} since {since}: "
                                f"wait for it or choose another run.dir (if that process is gone, remove "
                                f"{self.path})") from None
            self.held = True
            return
        raise UserError(f"run.dir={self.run_dir}: could not take its lock {self.path} (another run keeps taking it)")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and self._holder() == self.me:
            storage.remove(self.path)
        self.held = False


def check_no_links(run_dir: str) -> None:
    """A run writes only inside the folder it was given: a symbolic link among what it writes (its
    files, exports, step folders) would send writes, or rotation's deletes, elsewhere."""
    if storage.is_remote(run_dir):  # an object store has no links
        return
    places = [run_dir] + [os.path.join(run_dir, d) for d in ("checkpoints", "exports")]
    for place in places:
        if not os.path.isdir(place):
            continue
        for name in sorted(os.listdir(place)):
            path = os.path.join(place, name)
            if os.path.islink(path):
                raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}): a run writes only inside "
                                f"run.dir={run_dir}; replace the link by the file or folder itself")


@contextlib.contextmanager
def held(run_dir: str, *, lead: bool) -> Iterator[None]:
    """Process 0 holds the run folder's lock for the group; every process learns whether it got it,
    so none goes on (and waits in a collective) when it did not."""
    lock, error = RunLock(run_dir), None
    if lead:
        try:
            lock.acquire()
            check_no_links(run_dir)
        except UserError as e:
            lock.release()
            error = e
    if jax.process_count() > 1:
        if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
            error = error or UserError(f"run.dir={run_dir} is in use by another run (see process 0's error)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()
