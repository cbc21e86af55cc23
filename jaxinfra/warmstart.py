"""Starting a fresh run from a trained model (`checkpoint.init_from`): a checkpoint step of any run,
a safetensors export or a Hugging Face Llama folder (hf.py), read a tensor at a time (digests checked), every shape checked, and placed
onto this run's mesh. The optimizer starts fresh at step 0: prune a dense pretrained model, or
fine-tune an export."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np

from jaxinfra import checkpoint as ckpt_lib
from jaxinfra import export as export_lib
from jaxinfra import hf
from jaxinfra.errors import UserError
from jaxinfra.names import tensor_name
from jaxinfra.step import ModelDef, TrainState


def _reader(path: str, shapes: dict[str, tuple[int, ...]]) -> tuple[Callable[[str], np.ndarray], set[str], str]:
    """(read tensor by name, the names there, what to call the source); `shapes`: the model's tensors."""
    if os.path.isdir(path) and hf.is_hf_folder(path):
        read, names = hf.reader(path, shapes)
        return read, names, f"{path} (Hugging Face Llama layout)"
    if path.endswith((".safetensors", ".index.json")) and os.path.isfile(path):
        tensors = export_lib.load(path)
        return tensors.__getitem__, set(tensors), path
    step_dir, step = ckpt_lib.locate(path)
    saved = ckpt_lib.SavedParams(step_dir)
    return saved.read, set(saved.entries), f"{step_dir} (step {step})"


def load(path: str, model: ModelDef, shardings: TrainState) -> tuple[Any, Any, str]:
    """(params, other model variables) from `path` on this run's shardings, and the source's name.
    Every tensor the model has must be there in the same shape, and nothing else."""
    key = f"checkpoint.init_from={path}"
    shapes = {tensor_name(p): tuple(a.shape) for tree in (model.params, model.state)
              for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}
    try:
        read, names, source = _reader(path, shapes)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    wanted: set[str] = set()

    def place(abstract: Any, sharding: Any, what: str) -> Any:
        flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        out = []
        for (p, a), sh in zip(flat, jax.tree.leaves(sharding)):
            name = tensor_name(p)
            wanted.add(name)
            if name not in names:
                raise UserError(f"{key}: has no tensor {name} (a {what} of the model, shape {tuple(a.shape)})")
            x = read(name)
            if tuple(x.shape) != tuple(a.shape):
                raise UserError(f"{key}: tensor {name} has shape {tuple(x.shape)}, the model's is {tuple(a.shape)}")
            x = np.asarray(x).astype(a.dtype)  # every process read the whole tensor: each places its shards
            out.append(jax.make_array_from_callback(x.shape, sh, lambda index, x=x: x[index]))
        return jax.tree_util.tree_unflatten(treedef, out)

    params = place(model.params, shardings.params, "parameter")
    state = place(model.state, shardings.model_state, "variable")
    extra = sorted(names - wanted)
    if extra:
        raise UserError(f"{key}: holds tensor {extra[0]} that the model does not have"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return params, state, source
