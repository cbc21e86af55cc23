"""The checkpoint layout's names, and reading it: which steps are complete, a step's record (config, mesh,
stacking, digests), and its parameters tensor by tensor, each checked against the digest it was saved with
(exports, inspection, sampling, init_from). Only ckpt/ names these folders and items; manager.py writes them."""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxinfra.ckpt import orbax_store
from jaxinfra.ckpt.digest import host_digest
from jaxinfra.core import storage
from jaxinfra.core.errors import UserError, one_line
from jaxinfra.core.names import path_str, take, tensor_name, whole_layers

STATE, META = "state", "meta"
CHECKPOINTS = "checkpoints"  # the folder of a run that holds the steps
ASIDE = ".aside"  # in it: steps newer than a resume's, kept until the run commits a step of its own
MODEL_STATE = "model_state"  # the state's item of other model variables (BatchNorm statistics)
MODEL_ITEMS = ("params", MODEL_STATE)  # what makes the model: exports and init_from read these
STACKED = "stacked"  # the metadata record's entry: Stacked module path -> its leading layer dims
DIGESTS = "digests"  # the metadata record's entry: tensor path -> digest of its bytes at save


def verify_digests(found: dict[str, str], expected: dict[str, str] | None, step: int, where: str) -> None:
    """Raise CorruptCheckpoint naming the first tensor whose bytes differ from those saved."""
    for name, digest in found.items() if expected is not None else ():
        if name in expected and expected[name] != digest:
            raise CorruptCheckpoint(step, where, ValueError(
                f"tensor {name} differs from the bytes saved (digest {digest}, recorded {expected[name]}): "
                f"{storage.join(where, str(step), STATE)} is damaged"))


def checkpoints_dir(run_dir: str) -> str:
    """Where a run folder keeps its checkpoint steps."""
    return storage.join(run_dir, CHECKPOINTS)


class CorruptCheckpoint(UserError):
    """A step that exists but cannot be read back."""

    def __init__(self, step: int, directory: str, cause: BaseException):
        text = one_line(cause, limit=10_000)
        found = re.search(rf"{re.escape(storage.join(directory, str(step)))}[^\s'\"]*", text)
        where = found.group(0) if found else storage.join(directory, str(step))
        super().__init__(f"checkpoint step {step} is unreadable ({where}): {one_line(cause)}; "
                         f"checkpoint.fallback=true resumes from the previous good step")
        self.step = step


def is_committed(step_dir: str) -> bool:
    """Whether a step folder holds a complete, committed checkpoint."""
    if not storage.isdir(step_dir):
        return False
    return ocp.step.is_checkpoint_finalized(step_dir, atomicity_options=orbax_store.atomicity(step_dir))


def complete_steps(root: str) -> list[int]:
    """The committed steps of a checkpoints folder, oldest first."""
    return sorted(int(d) for d in storage.listdir(root) if d.isdigit() and is_committed(storage.join(root, d)))


def has_steps(run_dir: str) -> bool:
    """Whether a run folder holds at least one complete checkpoint step."""
    return bool(complete_steps(checkpoints_dir(run_dir)))


def locate(directory: str, step: int | None = None) -> tuple[str, int]:
    """A run folder, its checkpoints folder, or one step's folder -> (step folder, step); the newest
    complete step unless `step` is given."""
    directory = storage.absolute(directory)
    storage.check(directory, "checkpoint folder")
    storage.reachable(directory, "checkpoint folder")
    if not storage.isdir(directory):
        raise UserError(f"{directory}: no such checkpoint folder")
    if storage.basename(directory).isdigit() and storage.isdir(storage.join(directory, STATE)):
        found = int(storage.basename(directory))
        if step is not None and step != found:
            raise UserError(f"--step {step} does not match the step folder {directory}")
        return directory, found
    root = checkpoints_dir(directory) if storage.isdir(checkpoints_dir(directory)) else directory
    steps = complete_steps(root)
    if not steps:
        raise UserError(f"{directory}: holds no complete checkpoint step")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"--step {step} is not in {root} (steps: {', '.join(map(str, steps))})")
    return storage.join(root, str(step)), step


def state_metadata(step_dir: str) -> Any:
    """The saved state's tree of (shape, dtype, sharding) metadata, read from one step folder."""
    if storage.is_remote(step_dir):
        orbax_store.orbax_bridge()
    try:
        return ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / STATE).tree
    except Exception as e:
        raise UserError(f"{step_dir}: unreadable checkpoint metadata ({one_line(e, 200)})") from None


def saved_record(step_dir: str) -> dict[str, Any]:
    """A step's metadata record (config, digests, ...), {} if it has none readable."""
    try:
        found = json.loads(storage.read_text(storage.join(step_dir, META, "metadata")))
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):  # no record, or not ours
        return {}


def saved_config(step_dir: str) -> dict[str, Any] | None:
    """The resolved config a step was trained with (from its metadata record), or None if it has none."""
    found = saved_record(step_dir).get("config")
    return found if isinstance(found, dict) else None


def saved_stacked_of(record: Any) -> dict[str, tuple[int, ...]]:
    """A record's stacked layers (module path -> leading layer dims); {} for a step saved before them."""
    found = record.get(STACKED) if isinstance(record, dict) else None
    return {str(k): tuple(int(d) for d in v) for k, v in found.items()} if isinstance(found, dict) else {}


def saved_stacked(step_dir: str) -> dict[str, tuple[int, ...]]:
    """A step folder's stacked layers (module path -> leading layer dims)."""
    return saved_stacked_of(saved_record(step_dir))


class SavedParams:
    """One step's model tensors (parameters, then other variables such as batch statistics), read a
    whole tensor at a time as host arrays (the optimizer state is skipped). Stacked layers read as
    one tensor per layer, named as a list of blocks names them ('blocks.0.attn.wq'): the stacked
    tensor is read once and kept while its layers are asked for in turn."""

    def __init__(self, step_dir: str):
        self.step_dir = step_dir
        self.tree = state_metadata(step_dir)
        digests = saved_record(step_dir).get(DIGESTS)
        self.digests = digests if isinstance(digests, dict) else None  # None: written before digests
        self.stored = {}  # stored name -> (item, key path, shape/dtype metadata); paths are unique across items
        for item in MODEL_ITEMS:
            flat, _ = jax.tree_util.tree_flatten_with_path(self.tree.get(item) or {},
                                                           is_leaf=lambda x: hasattr(x, "shape"))
            self.stored.update({tensor_name(p): (item, p, x) for p, x in flat})
        self.layers = whole_layers({n: tuple(m.shape) for n, (_, _, m) in self.stored.items()},
                                   saved_stacked(step_dir), sep=".")
        # name -> (item, key path, shape and dtype) of each tensor as users see it
        self.entries = {n: (self.stored[l.stored][0], self.stored[l.stored][1],
                            jax.ShapeDtypeStruct(l.shape, self.stored[l.stored][2].dtype))
                        for n, l in self.layers.items()}
        self._kept: tuple[str, np.ndarray] | None = None

    def read(self, name: str) -> np.ndarray:
        """One saved tensor (or one layer of a stacked one) as a whole host array."""
        layer = self.layers[name]
        if layer.index is None:
            return self._read_stored(name)
        if self._kept is None or self._kept[0] != layer.stored:
            self._kept = None  # the previous stacked tensor is freed before the next is read
            self._kept = (layer.stored, self._read_stored(layer.stored))
        return np.ascontiguousarray(take(self._kept[1], layer))

    def _read_stored(self, name: str) -> np.ndarray:
        """One stored tensor, whole, its digest checked."""
        where, path, _ = self.stored[name]
        item = jax.tree.map(lambda _: ocp.PLACEHOLDER, self.tree, is_leaf=lambda x: hasattr(x, "shape"))
        node = item[where]
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = np.zeros((), np.float32)  # any array marks the leaf to read
        args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            out = ocp.PyTreeCheckpointHandler().restore(epath.Path(self.step_dir) / STATE,
                                                        args=ocp.args.PyTreeRestore(item=item, restore_args=args))
        except Exception as e:  # tensorstore's errors: a damaged file, or the step deleted underneath us
            if not is_committed(self.step_dir):
                raise UserError(f"{self.step_dir} was removed while tensor {name} was being read (a run writing "
                                f"this folder rotated it out: read a step it keeps, see checkpoint.keep_every)"
                                ) from None
            raise UserError(f"{self.step_dir}: tensor {name} is unreadable ({one_line(e)})") from None
        node = out[where]
        for k in keys:
            node = node[k]
        array = np.asarray(node)
        key = f"{where}/{path_str(path)}"
        root, step = storage.dirname(self.step_dir), storage.basename(self.step_dir)
        verify_digests({key: f"{host_digest(array):08x}"}, self.digests, int(step) if step.isdigit() else -1, root)
        return array

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return ((name, self.read(name)) for name in self.entries)


def iter_params(directory: str, step: int | None = None) -> tuple[int, Iterator[tuple[str, np.ndarray]]]:
    """(step, generator of (name, whole host array)) of a checkpoint step, read a tensor at a time."""
    step_dir, step = locate(directory, step)
    return step, iter(SavedParams(step_dir))


def read_params(directory: str, step: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """A checkpoint step's parameters as whole host arrays, name -> array, read a tensor at a time."""
    step, tensors = iter_params(directory, step)
    return dict(tensors), step
