"""Starting a fresh run from a trained model (`checkpoint.init_from`): a checkpoint step of any run,
a safetensors export or a Hugging Face folder (hub/hf.py), read a tensor at a time (digests checked), every shape checked, and placed
onto this run's mesh. The optimizer starts fresh at step 0: prune a dense pretrained model, or
fine-tune an export."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import tensor_name, whole_layers
from jaxinfra.core.state import TrainState
from jaxinfra.export import safetensors as safetensors_lib
from jaxinfra.hub import families, hf
from jaxinfra.parallel import sharding as shd
from jaxinfra.train.step import ModelDef


class _Tensors(Mapping):
    """A source's tensors by name, read when asked (one at a time: host memory stays about a tensor)."""

    def __init__(self, read: Callable[[str], np.ndarray], names: set[str]):
        self.read, self.names = read, names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


def _reader(path: str, shapes: dict[str, tuple[int, ...]]) -> tuple[Callable[[str], np.ndarray], set[str], str]:
    """(read tensor by name, the names there, what to call the source); `shapes`: the model's tensors."""
    if families.is_hf_folder(path):
        read, names = hf.reader(path, shapes)
        return read, names, f"{path} (a Hugging Face {families.read_config(path)['model_type']} folder)"
    if path.endswith((".safetensors", ".index.json")) and storage.isfile(path):
        tensors = safetensors_lib.load(path)
        return tensors.__getitem__, set(tensors), path
    step_dir, step = ckpt_reader.locate(path)
    saved = ckpt_reader.SavedParams(step_dir)
    return saved.read, set(saved.entries), f"{step_dir} (step {step})"


def load(path: str, model: ModelDef, shardings: TrainState) -> tuple[Any, Any, str]:
    """(params, other model variables) from `path` on this run's shardings, and the source's name.
    Every tensor the model has must be there in the same shape, and nothing else."""
    key = f"checkpoint.init_from={path}"
    shapes = {name: layer.shape for name, layer in whole_layers(
        {tensor_name(p): tuple(a.shape) for tree in (model.params, model.state)
         for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}, model.stacked, sep=".").items()}
    try:
        read, names, source = _reader(path, shapes)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    tensors = _Tensors(read, names)
    params = shd.to_params(tensors, model.params, shardings.params, key, model.stacked)
    state = shd.to_params(tensors, model.state, shardings.model_state, key, model.stacked)
    extra = sorted(names - set(shapes))
    if extra:
        raise UserError(f"{key}: holds tensor {extra[0]} that the model does not have"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return params, state, source
