"""Restoring a checkpoint whose layers were stacked otherwise than the target's ((L, ...), (R, L/R, ...), or one
tensor per layer as saved before stacking): the saved layout to restore into, the jitted conversion onto the
target's shardings, and the shape check that names the tensor when the two really differ."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfra.core.errors import UserError
from jaxinfra.core.names import path_str, take, whole_layers


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {path_str(p): (tuple(x.shape), str(x.dtype)) for p, x in flat}


def relayout(saved: Any, item: dict[str, Any], saved_stacked: dict[str, Any], stacked: dict[str, Any]
              ) -> tuple[dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]] | None:
    """When the saved tensors are the target's with layers stacked otherwise ((L, ...), (R, L/R, ...),
    or one tensor per layer as saved before stacking): (restore target in the saved layout, jitted
    conversion to the target's); None when the layouts agree or the tensors differ (check_shapes says how).
    A saved tensor is restored with its layer dims whole and its other dims split as the target's are."""
    have = {p: shape for p, (shape, _) in _flat_shapes(saved).items()}
    want = {p: shape for p, (shape, _) in _flat_shapes(item).items()}
    if have == want:
        return None
    saved_layers, target_layers = whole_layers(have, saved_stacked), whole_layers(want, stacked)
    if set(saved_layers) != set(target_layers) or any(saved_layers[n].shape != target_layers[n].shape
                                                      for n in target_layers):
        return None
    targets = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(item)[0]}
    spec_of: dict[str, tuple[Any, ...]] = {}
    for name, t in target_layers.items():
        dst, src = targets[t.stored], saved_layers[name]
        spec_of[src.stored] = (None,) * src.lead + tuple(dst.sharding.spec)[t.lead:] if dst.sharding.spec else ()
    mesh = next(iter(targets.values())).sharding.mesh
    dtype_of = {saved_layers[n].stored: targets[t.stored].dtype for n, t in target_layers.items()}

    def restore_as(path: tuple, meta: Any) -> jax.ShapeDtypeStruct:
        name = path_str(path)
        return jax.ShapeDtypeStruct(tuple(meta.shape), dtype_of[name],
                                    sharding=NamedSharding(mesh, PartitionSpec(*spec_of[name])))
    as_saved = jax.tree_util.tree_map_with_path(restore_as, saved, is_leaf=lambda x: hasattr(x, "shape"))
    parts: dict[str, list[str]] = {}
    for name, t in target_layers.items():
        parts.setdefault(t.stored, []).append(name)

    def convert(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
        out = {}
        for path, names in parts.items():
            pieces = [take(flat[saved_layers[n].stored], saved_layers[n]) for n in names]
            out[path] = pieces[0] if target_layers[names[0]].index is None \
                else jnp.stack(pieces).reshape(targets[path].shape)
        return out
    shardings = {p: x.sharding for p, x in targets.items()}
    relayout = jax.jit(convert, out_shardings=shardings)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(item)

    def to_target(restored: dict[str, Any]) -> dict[str, Any]:
        flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
        done = relayout(flat)
        return jax.tree_util.tree_unflatten(treedef, [done[path_str(p)] for p, _ in leaves])
    return as_saved, to_target


def check_shapes(saved: Any, target: Any, step: int) -> None:
    """The checkpoint must hold the tensors the model expects, in the same shapes (dtypes may be
    cast): name the first that differs."""
    have, want = _flat_shapes(saved), _flat_shapes(target)
    for name, (shape, dtype) in want.items():
        if name not in have:
            raise UserError(f"checkpoint step {step} has no tensor {name} (the model, optim or prune config "
                            f"differs from the saved one, or an older jaxinfra wrote it?); to start from its model "
                            f"with this config, use another run.dir and checkpoint.init_from=<this run.dir>")
        if have[name][0] != shape:
            raise UserError(f"checkpoint step {step}: tensor {name} has shape {have[name][0]}, the model expects "
                            f"{shape} (the model config differs from the saved one)")
    extra = sorted(set(have) - set(want))
    if extra:
        raise UserError(f"checkpoint step {step} holds tensor {extra[0]} that the model does not have "
                        f"(the model config differs from the saved one)")
