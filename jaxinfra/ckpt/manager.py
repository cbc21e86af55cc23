"""Writing and restoring checkpoints: Orbax async sharded saves, the metadata record, resume and restore
onto any mesh, preemption (reader.py reads a step's parameters tensor by tensor).

A run folder holds `checkpoints/<step>/`, one Orbax Composite per step: `state` (step, params,
optimizer state: every leaf sharded as in training) and `meta` (JSON: resolved config, versions,
mesh, data position, and the digest of every saved array: see digest.py). Every read (restore,
export, sampling) checks the digests of what it read and refuses a damaged step. A step is
complete once Orbax has committed it; an interrupted save is never listed. The data position is the number of global batches consumed, equal to the step, on any
number of processes (see data/sources.py), so no per-process iterator state is needed to resume exactly.
No other module names these folders or items.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import signal
import sys
import threading
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from omegaconf import OmegaConf

from jaxinfra.ckpt import orbax_store
from jaxinfra.ckpt.digest import tree_digests
from jaxinfra.ckpt.reader import (
    ASIDE,
    DIGESTS,
    META,
    MODEL_STATE,
    STACKED,
    STATE,
    CorruptCheckpoint,
    complete_steps,
    is_committed,
    saved_stacked_of,
    verify_digests,
)
from jaxinfra.ckpt.relayout import check_shapes, relayout
from jaxinfra.core import storage
from jaxinfra.core.errors import Failed, UserError, one_line
from jaxinfra.core.names import path_str
from jaxinfra.core.state import TrainState

log = logging.getLogger(__name__)


def digests_of(state: TrainState | dict[str, Any]) -> dict[str, str]:
    """Tensor path ('params/blocks/attn/wq') -> digest of its bytes, computed on the devices where
    the state lives (each its shards, no gathering)."""
    tree = as_dict(state) if isinstance(state, TrainState) else state
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree_digests(tree)))
    return {path_str(p): f"{int(v):08x}" for p, v in flat}


def record(cfg: Any, mesh: jax.sharding.Mesh, step: int, data: dict[str, Any], kernels: dict[str, Any] | None = None,
           stacked: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """The metadata record a step carries besides arrays: config, versions, mesh, data position, the
    model's matmul weights with the dims they contract (what an int8 export needs to know), and its
    stacked layers (module path -> leading layer dims: what splits them into whole layers)."""
    versions = {}
    for pkg in ("jaxinfra", "jax", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "unknown"
    return {"step": step, "config": OmegaConf.to_container(OmegaConf.structured(cfg)), "versions": versions,
            "mesh": dict(mesh.shape), "processes": jax.process_count(),
            "data": {"global_batches_consumed": step, **data}, **({"kernels": kernels} if kernels else {}),
            STACKED: {k: list(v) for k, v in (stacked or {}).items()}}


def as_dict(state: TrainState) -> dict[str, Any]:
    """TrainState -> the plain dict that is saved (keys: step, params, opt_state)."""
    return state._asdict()


def _say_at_once(line: str) -> None:
    """A line on stdout from a signal handler. Python runs the handler between two instructions of the
    main thread, possibly inside a write to sys.stdout that the signal interrupted: the line goes out
    with os.write, never through sys.stdout (a reentrant write there raises), after what sys.stdout
    holds when it can be flushed (when it cannot, the line may come before that). Never raises."""
    try:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        fd, data = sys.stdout.fileno(), (line + "\n").encode()
        while data:
            data = data[os.write(fd, data):]
    except Exception:  # a stdout with no file descriptor (captured) or closed: the flag alone, unsaid
        pass


class Checkpointer:
    """An async CheckpointManager over `directory`, plus a SIGTERM flag for single-process runs."""

    def __init__(self, directory: str, *, keep: int = 2, keep_every: int = 0, read_only: bool = False,
                 digests: bool = True):
        self.directory, self.digests = storage.absolute(directory), digests  # digests=False: benchmarks only
        self._sigterm = self._failed = False
        self._asked: int | None = None  # the last step preempted() was asked about (None: no step finished yet)
        self._in_flight: int | None = None  # the step whose async save was started last, until waited on
        if storage.is_remote(self.directory):
            orbax_store.orbax_bridge()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=not read_only, read_only=read_only,
            enable_async_checkpointing=True, atomicity_options=orbax_store.atomicity(self.directory))
        handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def watch_sigterm(self) -> Callable[[], None]:
        """Single process (no jax.distributed preemption sync): SIGTERM sets a flag checked each step
        and says at once, in a line before any later one, the last step finished when it came ("before
        the first step of this run" while the step compiles).

        Returns the function that puts the previous handler back.
        """
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGTERM)

        def caught(*_: Any) -> None:
            if not self._sigterm:
                when = f"after step {self._asked}" if self._asked else "before the first step of this run"
                _say_at_once(f"SIGTERM received {when}: the run saves at the end of its current step and stops")
            self._sigterm = True

        signal.signal(signal.SIGTERM, caught)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def preempted(self, step: int) -> bool:
        """True on every process at one agreed step after a SIGTERM (or on this one, if alone)."""
        self._asked = step
        return self._sigterm or self.manager.reached_preemption(step)

    def committed(self, step: int) -> bool:
        """Whether `step` is on disk and committed (a stat or two: cheap enough to poll each step)."""
        return is_committed(storage.join(self.directory, str(step)))

    def steps(self) -> list[int]:
        """Complete steps on disk, oldest first (interrupted saves are never listed)."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Start an async save (the record gains the arrays' digests); returns once the arrays are
        copied off the devices."""
        meta = {**meta, DIGESTS: digests_of(state)} if self.digests else meta
        with self._failing(step):  # the previous async save's failure surfaces here
            self.manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(as_dict(state)),
                                                              META: ocp.args.JsonSave(meta)}), force=True)
        self._in_flight = step

    def _failed_step(self, starting: int | None) -> int | None:
        """The step a failure belongs to: the save in flight unless it committed, else the one starting
        (on a store a failed write leaves no *.orbax-checkpoint-tmp* name in the error to read it from)."""
        for step in (self._in_flight, starting):
            if step is not None:
                try:
                    if not self.committed(step):
                        return step
                except Exception:  # the store that failed the save may fail this look too
                    return step
        return None

    @contextlib.contextmanager
    def _failing(self, starting: int | None = None) -> Iterator[None]:
        """A failed save (a full disk, a folder removed, a store that keeps refusing writes) as one Failed
        line naming the step and what is safe."""
        try:
            yield
        except Exception as e:
            if self._failed:  # reported once; the rest is the same failure unwinding
                return
            self._failed = True
            text = " ".join(str(e).split())
            found = re.search(r"/(\d+)\.orbax-checkpoint-tmp", text)
            step = int(found.group(1)) if found else self._failed_step(starting)
            what = f"checkpoint step {step}" if step is not None else "a checkpoint"
            # tensorstore's long message holds the OS error and the file: say those. Its wording varies with
            # what was being written ('Failed writing: "F": ...', or 'Error writing "K" in OCDBT database at local
            # file "F": ...'), so take the last file named before the OS error
            os_error = re.search(r'"([^"]+)"[^"]*?: ([^:\[\]"]+?) \[os_error_code', text)
            cause = f"{os_error.group(2)} ({os_error.group(1)})" if os_error else one_line(e)
            kept = complete_steps(self.directory)
            safe = ("no step was saved" if not kept else f"step {kept[0]} stays restorable" if len(kept) == 1
                    else f"steps {', '.join(map(str, kept))} stay restorable")
            raise Failed(f"saving {what} in {self.directory} failed: {cause}; {safe}") from None

    def saved_shapes(self, step: int) -> dict[str, Any]:
        """The saved state's tree of (shape, dtype, sharding) metadata, without reading arrays."""
        return self.manager.item_metadata(step)[STATE].tree

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of a step."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:
            raise CorruptCheckpoint(step, self.directory, e) from None

    # Steps newer than the one a run resumes from are set aside, not deleted, until the run commits a
    # step of its own: a crash before that loses nothing (the next start puts them back).
    def _aside(self) -> str:
        return storage.join(self.directory, ASIDE)

    def set_aside(self, step: int) -> list[int]:
        """Move the steps newer than `step` out of sight, into checkpoints/.aside/; returns them."""
        newer = [s for s in self.steps() if s > step]
        if newer and jax.process_index() == 0:
            storage.makedirs(self._aside())
            storage.write_text(storage.join(self._aside(), "resumed_from"), str(step))
            for s in newer:  # on a store each step is copied whole before its original goes
                storage.move(storage.join(self.directory, str(s)), storage.join(self._aside(), str(s)))
        if newer:
            self._moved()
        return newer

    def _moved(self) -> None:
        """After process 0 moved step folders: every process waits for it, then rereads the steps."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxinfra checkpoint steps moved")
        self.manager.reload()

    def drop_aside(self) -> list[int]:
        """Delete the steps set aside (a newer step of this run is committed); returns them."""
        dropped = complete_steps(self._aside())
        if jax.process_index() == 0 and storage.isdir(self._aside()):
            storage.rmtree(self._aside())
        return dropped

    def put_back(self) -> list[int]:
        """At start: steps set aside by a run that died before committing a step of its own go back
        (if it did commit one, they are dropped); returns the steps put back."""
        if not storage.isdir(self._aside()):
            return []
        try:
            resumed = int(storage.read_text(storage.join(self._aside(), "resumed_from")))
        except (OSError, ValueError):
            resumed = -1
        if any(s > resumed for s in self.steps()):
            self.drop_aside()
            return []
        back = complete_steps(self._aside())
        if jax.process_index() == 0:
            for s in back:
                storage.move(storage.join(self._aside(), str(s)), storage.join(self.directory, str(s)))
            storage.rmtree(self._aside())
        self._moved()
        return back

    def restore(self, step: int, target: TrainState, digests: dict[str, str] | None = None,
                stacked: dict[str, Any] | None = None, saved_stacked: dict[str, Any] | None = None) -> TrainState:
        """Restore onto the shardings `target`'s ShapeDtypeStructs carry (any mesh, any device count),
        each tensor checked against `digests` (the step's record) where given. Layers stacked otherwise
        than the target's (`stacked`; `saved_stacked` from the step's record), or saved as a list of
        blocks before layers were stacked, are restored as saved and then restacked."""
        try:
            saved = self.saved_shapes(step)
        except Exception as e:  # metadata lives in the same files: truncation shows here first
            raise CorruptCheckpoint(step, self.directory, e) from None
        item = as_dict(target)
        if MODEL_STATE not in saved and not jax.tree.leaves(target.model_state):
            item.pop(MODEL_STATE)  # written before the state carried other variables: nothing is missing
        other_layout = relayout(saved, item, saved_stacked or {}, stacked or {})
        if other_layout is not None:
            item, convert = other_layout
        else:
            check_shapes(saved, item, step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(item)}))[STATE]
        except Exception as e:  # a corrupt or truncated file surfaces here, from tensorstore
            raise CorruptCheckpoint(step, self.directory, e) from None
        if digests:
            verify_digests(digests_of(out), digests, step, self.directory)
        if other_layout is not None:
            out = convert(out)
        return TrainState(**{MODEL_STATE: {}, **out})

    def wait(self) -> None:
        """Block until the last async save is committed."""
        with self._failing():
            self.manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        with self._failing():
            self.manager.wait_until_finished()
            self.manager.close()


def resume(ckpt: Checkpointer, target: TrainState, *, restore_step: int = -1,
           fallback: bool = False,
           meta: Callable[[int, dict[str, Any]], None] | None = None,
           stacked: dict[str, Any] | None = None) -> TrainState | None:
    """The newest complete step (or `restore_step`) restored onto target's shardings; None if none.

    `meta(step, record)` checks the step's metadata record (read first: a step without one is unreadable).
    With `fallback`, an unreadable step is reported and the previous one tried instead.
    """
    steps = ckpt.steps()
    if not steps and restore_step < 0:
        return None
    if restore_step >= 0:
        if restore_step not in steps:
            raise UserError(f"checkpoint.restore_step={restore_step} is not in {ckpt.directory} "
                            f"(steps: {', '.join(map(str, steps))})")
        steps = [s for s in steps if s <= restore_step]
    for step in reversed(steps):
        try:
            record = ckpt.meta(step)
            if meta is not None:
                meta(step, record)
            return ckpt.restore(step, target, record.get(DIGESTS) if isinstance(record, dict) else None, stacked,
                                saved_stacked_of(record))
        except CorruptCheckpoint as e:
            if not fallback:
                raise
            log.warning(f"warning: {str(e).split('; checkpoint.fallback')[0]}; trying the previous step")
    raise UserError(f"no readable checkpoint in {ckpt.directory} (tried steps {', '.join(map(str, steps))})")


# Reading a step without a manager: the readers (export, inspect, compare, generate) never write.


