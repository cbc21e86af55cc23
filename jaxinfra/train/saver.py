"""When to save, export and stop: the checkpointer of a run decides its own frequency.

The loop calls `Saver.maybe_save(step, state, last=...)` after every step; the saver decides among
`checkpoint.every`, `checkpoint.export_every`, the final step, `run.stop_after` and preemption
(SIGTERM), refuses to save a non-finite state, and keeps the checkpointer's rotation from deleting
a step the exporter has still to read. It also owns the resume at start-up (`restore`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import jax

from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core import storage
from jaxinfra.core.errors import Diverged, UserError
from jaxinfra.core.state import TrainState
from jaxinfra.export import writer as export_lib
from jaxinfra.settings.sections import CheckpointConfig
from jaxinfra.train import exporter
from jaxinfra.train.step import all_finite

log = logging.getLogger(__name__)

_all_finite = jax.jit(all_finite)  # on the device: no host pass over the state


class Saver:
    """The run's checkpointer and exporter, asked once per step what is due."""

    def __init__(self, run_dir: str, cfg: CheckpointConfig, *, stop_after: int,
                 record: Callable[[int], dict[str, Any]], lead: bool, on_save: Sequence[Callable[[], Any]] = ()):
        self.cfg, self.stop_after, self.record, self.on_save = cfg, stop_after, record, tuple(on_save)
        self.ckpt = ckpt_lib.Checkpointer(ckpt_reader.checkpoints_dir(run_dir), keep=cfg.keep, keep_every=cfg.keep_every)
        self.exporter = exporter.BackgroundExporter(self.ckpt, run_dir, cfg.export_dtype, enabled=lead,
                                                      fmt=cfg.export_format)
        self.start = 0
        self.aside: list[int] = []  # steps set aside by the resume, deleted once this run commits one
        self.first_saved: int | None = None  # the first step this run saved
        self.stopped_at: int | None = None  # the step a preemption or run.stop_after ended the run at
        self.resumed_record: dict[str, Any] = {}  # the metadata record of the step restore() resumed from

    def restore(self, target: TrainState, data: Mapping[str, Any], names: Mapping[str, str],
                stacked: Mapping[str, Any] | None = None) -> TrainState | None:
        """The newest (or checkpoint.restore_step's) state onto target's shardings, None for a fresh run.

        `data` is this run's data position record and `names` the config name of each of its keys: a
        step trained with other values cannot continue this run's data order (UserError).
        """
        c, ckpt = self.cfg, self.ckpt
        back = ckpt.put_back()
        if back:
            log.info(f"put back checkpoint steps {', '.join(map(str, back))}, set aside by an earlier run that "
                     f"resumed from an older step and stopped before saving one of its own")
        if not c.resume and ckpt.steps():
            raise UserError(f"checkpoint.resume=false but {ckpt.directory} holds steps "
                            f"{', '.join(map(str, ckpt.steps()))}: choose another run.dir (or remove them)")

        def same_data(step: int, record: dict[str, Any]) -> None:
            self.resumed_record = record if isinstance(record, dict) else {}
            saved = record.get("data") if isinstance(record, dict) else None
            if not isinstance(saved, dict):
                raise ckpt_reader.CorruptCheckpoint(step, ckpt.directory, ValueError("no data position in meta/metadata"))
            for key, name in names.items():
                if key in saved and saved[key] != data[key]:
                    raise UserError(f"checkpoint step {step} was trained with {name}={saved[key]}, now {data[key]}: "
                                    f"the data position would not carry over (start fresh in another run.dir)")

        state = ckpt_lib.resume(ckpt, target, restore_step=c.restore_step, fallback=c.fallback,
                                meta=same_data, stacked=dict(stacked or {})) if c.resume else None
        if state is None:
            return None
        step = int(state.step)
        log.info(f"resumed from step {step} of {ckpt.directory}")
        self.aside = ckpt.set_aside(step)
        if self.aside:
            log.info(f"set aside newer checkpoint steps {', '.join(map(str, self.aside))}: removed once this run "
                     f"commits a step (training writes them again)")
        self.start = step
        return state

    def saved_steps(self) -> int | None:
        """run.steps of the run that saved the resumed step (None when its record does not say)."""
        saved = self.resumed_record.get("config")
        steps = saved.get("run", {}).get("steps") if isinstance(saved, dict) else None
        return steps if isinstance(steps, int) else None

    def _drop_aside(self) -> None:
        """Once this run has committed a step, the steps set aside at the resume go for good."""
        if self.aside and self.first_saved is not None and self.ckpt.committed(self.first_saved):
            self.ckpt.drop_aside()
            log.info(f"removed newer checkpoint steps {', '.join(map(str, self.aside))} (set aside at the resume) "
                     f"now that step {self.first_saved} is committed")
            self.aside = []

    def watch_sigterm(self) -> Callable[[], None]:
        """Catch SIGTERM for the rest of the run; returns the function that restores the old handler."""
        return self.ckpt.watch_sigterm()

    def maybe_save(self, step: int, state: TrainState, *, last: bool) -> bool:
        """Save and export what is due after `step`; True when the run must stop here."""
        c = self.cfg
        self.exporter.poll()
        self._drop_aside()
        preempted = self.ckpt.preempted(step)
        stop = preempted or bool(self.stop_after and step - self.start >= self.stop_after)
        export_now = bool(c.export_every and step % c.export_every == 0) or (c.export_final and last)
        if stop or export_now or last or (c.every and step % c.every == 0):
            self._save(step, state)
            if export_now:
                self.exporter.request(step)
        if stop:
            log.info(f"stopping at step {step} ({'SIGTERM' if preempted else 'run.stop_after'}); "
                     f"checkpoint saved, a restart resumes from it")
            self.stopped_at = step
        return stop

    def owe_final_export(self, step: int) -> None:
        """Export the last step, already committed, if the run wants it and its file is missing."""
        # both formats appear under their final name only once whole (a file renamed, a folder renamed)
        if self.cfg.export_final and not storage.exists(export_lib.export_path(self.exporter.run_dir, step,
                                                                              self.cfg.export_format)):
            self.exporter.request(step)

    def _save(self, step: int, state: TrainState) -> None:
        if not bool(_all_finite((state.params, state.opt_state, state.model_state))):  # never save a diverged state to resume from
            raise Diverged(f"parameters or optimizer state became NaN or Inf at step {step}; not checkpointed")
        if self.exporter.busy:  # this save may rotate out a step still to be exported
            self.ckpt.wait()
            self.exporter.drain()
        self.ckpt.save(step, state, self.record(step))
        if self.first_saved is None:
            self.first_saved = step
        for hook in self.on_save:  # after each save: the trainer flushes and uploads its logs
            hook()

    def finish(self) -> tuple[list[str], list[str]]:
        """Wait for the last save, write the exports still owed: (files written, one line per failure)."""
        self.ckpt.wait()
        self._drop_aside()
        self.exporter.drain()
        return self.exporter.written, self.exporter.errors

    def close(self) -> None:
        """Finish pending saves and exports and release the checkpointer (also after a failure)."""
        self.ckpt.close()
        self._drop_aside()
        self.exporter.drain()
