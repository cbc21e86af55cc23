"""Orbax checkpoints of the train state: async sharded saves, resume, restore onto any mesh,
preemption, and integrity (a step is either complete or invisible).

One Composite per step: `state` (step, params, optimizer state: every leaf sharded as in training)
and `meta` (JSON: resolved config, versions, mesh, data position). The data position is the
number of global batches consumed, equal to the step, on any number of processes (see data.py),
so no per-process iterator state is needed to resume exactly.
"""
from __future__ import annotations

import os
import re
import signal
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jaxinfra.errors import UserError
from jaxinfra.train import TrainState

STATE, META = "state", "meta"


def as_dict(state: TrainState) -> dict[str, Any]:
    """TrainState -> the plain dict that is saved (keys: step, params, opt_state)."""
    return state._asdict()


class Checkpointer:
    """An async CheckpointManager over `directory`, plus a SIGTERM flag for single-process runs."""

    def __init__(self, directory: str, *, keep: int = 2, keep_every: int = 0, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self._sigterm = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=not read_only, read_only=read_only,
            enable_async_checkpointing=True)
        handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def watch_sigterm(self) -> Callable[[], None]:
        """Single process (no jax.distributed preemption sync): SIGTERM sets a flag checked each step.

        Returns the function that puts the previous handler back.
        """
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_sigterm", True))
        return lambda: signal.signal(signal.SIGTERM, previous)

    def preempted(self, step: int) -> bool:
        """True on every process at one agreed step after a SIGTERM (or on this one, if alone)."""
        return self._sigterm or self.manager.reached_preemption(step)

    def steps(self) -> list[int]:
        """Complete steps on disk, oldest first (interrupted saves are never listed)."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Start an async save; returns once the arrays are copied off the devices."""
        self.manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(as_dict(state)),
                                                          META: ocp.args.JsonSave(meta)}), force=True)

    def saved_shapes(self, step: int) -> dict[str, Any]:
        """The saved state's tree of (shape, dtype, sharding) metadata, without reading arrays."""
        return self.manager.item_metadata(step)[STATE].tree

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of a step."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:
            raise CorruptCheckpoint(step, self.directory, e) from None

    def delete_after(self, step: int) -> list[int]:
        """Remove the steps newer than `step` (a resume from an older one writes them again)."""
        newer = [s for s in self.steps() if s > step]
        for s in newer:
            self.manager.delete(s)
        return newer

    def restore(self, step: int, target: TrainState) -> TrainState:
        """Restore onto the shardings `target`'s ShapeDtypeStructs carry (any mesh, any device count)."""
        try:
            saved = self.saved_shapes(step)
        except Exception as e:  # metadata lives in the same files: truncation shows here first
            raise CorruptCheckpoint(step, self.directory, e) from None
        check_shapes(saved, as_dict(target), step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(
                as_dict(target))}))[STATE]
        except Exception as e:  # a corrupt or truncated file surfaces here, from tensorstore
            raise CorruptCheckpoint(step, self.directory, e) from None
        return TrainState(**out)

    def wait(self) -> None:
        """Block until the last async save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


class CorruptCheckpoint(UserError):
    """A step that exists but cannot be read back."""

    def __init__(self, step: int, directory: str, cause: BaseException):
        text = " ".join(str(cause).split())
        found = re.search(rf"{re.escape(os.path.join(directory, str(step)))}[^\s'\"]*", text)
        where = found.group(0) if found else os.path.join(directory, str(step))
        super().__init__(f"checkpoint step {step} is unreadable ({where}): {text[:200]}; "
                         f"checkpoint.fallback=true resumes from the previous good step")
        self.step = step


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {jax.tree_util.keystr(p, simple=True, separator="/"): (tuple(x.shape), str(x.dtype)) for p, x in flat}


def check_shapes(saved: Any, target: Any, step: int) -> None:
    """The checkpoint must hold the tensors the model expects, in the same shapes (dtypes may be
    cast): name the first that differs."""
    have, want = _flat_shapes(saved), _flat_shapes(target)
    for name, (shape, dtype) in want.items():
        if name not in have:
            raise UserError(f"checkpoint step {step} has no tensor {name} (the model, optim or prune config "
                            f"differs from the saved one, or an older jaxinfra wrote it?)")
        if have[name][0] != shape:
            raise UserError(f"checkpoint step {step}: tensor {name} has shape {have[name][0]}, the model expects "
                            f"{shape} (the model config differs from the saved one)")
    extra = sorted(set(have) - set(want))
    if extra:
        raise UserError(f"checkpoint step {step} holds tensor {extra[0]} that the model does not have "
                        f"(the model config differs from the saved one)")


def resume(ckpt: Checkpointer, target: TrainState, *, restore_step: int = -1,
           fallback: bool = False, say: Callable[[str], None] = print) -> TrainState | None:
    """The newest complete step (or `restore_step`) restored onto target's shardings; None if none.

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
            return ckpt.restore(step, target)
        except CorruptCheckpoint as e:
            if not fallback:
                raise
            say(f"warning: {str(e).split('; checkpoint.fallback')[0]}; trying the previous step")
    raise UserError(f"no readable checkpoint in {ckpt.directory} (tried steps {', '.join(map(str, steps))})")
