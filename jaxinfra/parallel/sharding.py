"""The one home of sharding rules: logical axis names -> mesh axes -> NamedSharding.

Models annotate every parameter with logical names (batch, seq, embed, heads, kv, mlp, vocab,
norm, or their own); `mesh.rules` in the config maps each name to zero or more mesh axes.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra.core.errors import UserError
from jaxinfra.core.names import find_stacked, path_str, tensor_name, whole_layers

Rules = Mapping[str, Sequence[str]]
LogicalNames = Sequence[str | None]


def logical_to_spec(names: LogicalNames, rules: Rules) -> P:
    """Logical names of an array's dimensions -> PartitionSpec over mesh axes.

    A mesh axis shards at most one dimension of an array: a later dimension asking for a
    mesh axis an earlier one already took gets the rest of its axes (or none).
    """
    used: set[str] = set()
    out: list[Any] = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise UserError(f"logical axis {name!r} has no rule in mesh.rules "
                            f"(known: {', '.join(sorted(rules))}); add mesh.rules.{name}=[...]")
        axes = tuple(a for a in rules[name] if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def named(mesh: Mesh, names: LogicalNames, rules: Rules) -> NamedSharding:
    """NamedSharding for one array with the given logical dimension names."""
    return NamedSharding(mesh, logical_to_spec(names, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (scalars, step counters)."""
    return NamedSharding(mesh, P())


def _is_names(x: Any) -> bool:
    return isinstance(x, P) or (isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x))


def tree_shardings(logical: Any, mesh: Mesh, rules: Rules) -> Any:
    """A pytree of logical PartitionSpecs (or name tuples) -> a pytree of NamedShardings."""
    return jax.tree.map(lambda names: named(mesh, tuple(names), rules), logical, is_leaf=_is_names)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    axes = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(abstract: Any, shardings: Any, logical: Any | None = None) -> None:
    """Every sharded dimension must split evenly over its mesh axes; raises UserError naming it."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    shards = jax.tree.leaves(shardings)
    names = jax.tree.leaves(logical, is_leaf=_is_names) if logical is not None else [None] * len(flat)
    for (path, leaf), sh, lnames in zip(flat, shards, names):
        for dim, (size, entry) in enumerate(zip(leaf.shape, sh.spec)):
            n = _axis_size(sh.mesh, entry)
            if size % n:
                lname = f" (logical {lnames[dim]!r})" if lnames is not None else ""
                raise UserError(f"parameter {path_str(path)} dim {dim}{lname} has size {size}, "
                                f"not divisible by mesh axes {entry} = {n}")


def check_logical_sizes(sizes: Mapping[str, tuple[str, int]], rules: Rules, mesh: Mesh) -> None:
    """Config-level check: each logical size divides by the mesh axes its rule names."""
    for name, (key, size) in sizes.items():
        axes, n = [a for a in rules.get(name, ()) if a in mesh.shape], ways(mesh, rules, name)
        if size % n:
            split = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
            raise UserError(f"{key}={size} is not divisible by {split} = {n} (mesh.rules.{name}={list(axes)})")


def batch_spec(rules: Rules, ndim: int = 2, leading: int = 0) -> P:
    """Spec of a batch: `leading` unsharded dims (micro-batches), then batch, seq, rest unsharded."""
    names: list[str | None] = [None] * leading + ["batch"] + (["seq"] if ndim - leading > 1 else [])
    names += [None] * (ndim - len(names))
    return logical_to_spec(names, rules)


def ways(mesh: Mesh, rules: Rules, name: str) -> int:
    """How many ways a logical axis is split: the product of the mesh axes its rule names."""
    return math.prod(mesh.shape[a] for a in rules.get(name, ()) if a in mesh.shape)


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split (data x fsdp by default)."""
    return ways(mesh, rules, "batch")


def shard(tree: Any, shardings: Any) -> Any:
    """Place a host or device pytree onto the given shardings."""
    return jax.device_put(tree, shardings)


def gather(tree: Any) -> Any:
    """Whole arrays as host numpy, from every process's shards (collective when multi-process)."""
    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


class LogicalConstraint:
    """Callable a model uses to pin an activation's sharding by logical names (keeps GSPMD from
    replicating activations around attention reshapes)."""

    def __init__(self, mesh: Mesh, rules: Rules):
        self.mesh, self.rules = mesh, {k: tuple(v) for k, v in rules.items()}

    def __call__(self, x: jax.Array, names: LogicalNames) -> jax.Array:
        spec = logical_to_spec(names, self.rules)
        if jax.sharding.get_abstract_mesh().axis_names == self.mesh.axis_names:
            # a bare spec resolves against the mesh in scope, which inside a pipeline stage (a shard_map
            # manual over stage) marks stage manual: a NamedSharding of the plain mesh is refused there
            return jax.lax.with_sharding_constraint(x, spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def tree_bytes(abstract: Any) -> int:
    """Bytes of a pytree of arrays or ShapeDtypeStructs, whole."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract))


def check_rules_used(rules: Rules, logical: Any, allowed: Sequence[str] = ()) -> None:
    """A rule for a logical name that no parameter uses is most likely a typo: say so."""
    used = {n for names in jax.tree.leaves(logical, is_leaf=_is_names) for n in names if n is not None}
    for name in rules:
        if name not in used and name not in allowed:
            close = difflib.get_close_matches(name, sorted(used), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"mesh.rules.{name}: no parameter of the model uses logical axis {name!r}{hint}")


def shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree under the given shardings."""
    return sum(math.prod(sh.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
               for a, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def _collapse(path: str) -> str:
    """blocks/3/attn/wq -> blocks/*/attn/wq: layers share a row of the report."""
    return "/".join("*" if part.isdigit() else part for part in path.split("/"))


def report(abstract: Any, logical: Any, shardings: Any, opt_abstract: Any = None, opt_shardings: Any = None,
           meant_to_shard: bool = False) -> tuple[list[str], str | None]:
    """The start-up sharding report: a row per parameter (layers collapsed) and a warning, if any.

    Each row: path, global shape, logical axes, mesh spec, per-device shard shape. A warning is
    returned when more than 2% of parameter bytes stay replicated while the mesh is meant to
    shard parameters (fsdp or tensor larger than 1).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    names = jax.tree.leaves(logical, is_leaf=_is_names)
    shards = jax.tree.leaves(shardings)
    rows: dict[str, list[str]] = {}
    total = replicated_bytes = 0
    for (path, a), lname, sh in zip(flat, names, shards):
        key = _collapse("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path))
        nbytes = math.prod(a.shape) * np.dtype(a.dtype).itemsize
        total += nbytes
        if sh.is_fully_replicated:
            replicated_bytes += nbytes
        rows.setdefault(key, [key, "x".join(map(str, a.shape)), ",".join(str(n) for n in lname) or "-",
                              str(tuple(sh.spec)), "x".join(map(str, sh.shard_shape(a.shape)))])
    header = ["parameter", "shape", "logical", "mesh spec", "per device"]
    table = [header, *rows.values()]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    n_dev = next(iter(shards)).mesh.devices.size if shards else 1
    line = f"parameters: {total / 2**20:.2f} MiB in all, {shard_bytes(abstract, shardings) / 2**20:.2f} MiB per device"
    if opt_abstract is not None:
        line += (f"; optimizer state: {tree_bytes(opt_abstract) / 2**20:.2f} MiB "
                 f"in all, {shard_bytes(opt_abstract, opt_shardings) / 2**20:.2f} MiB per device")
    lines.append(line + f" ({n_dev} devices)")
    warning = None
    if meant_to_shard and total and replicated_bytes / total > 0.02:
        warning = (f"warning: {100 * replicated_bytes / total:.1f}% of parameter bytes are replicated on every "
                   f"device although the mesh shards parameters; check mesh.rules")
    return lines, warning


def to_params(flat: Mapping[str, np.ndarray], abstract_params: Any, shardings: Any, where: str = "the export",
              stacked: Mapping[str, Any] | None = None) -> Any:
    """Put loaded tensors (name -> host array; a lazy Mapping is read once per tensor) into a tree
    shaped like `abstract_params` on the given shardings (any mesh, any process count); names and
    shapes must match. A Stacked module's tensors (`stacked`, ModelDef.stacked; found by name when
    not given) are assembled from one tensor per layer ('blocks.0.attn.wq', ...). `where` names the
    source in errors."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    out = []
    for (path, a), sh in zip(leaves, jax.tree.leaves(shardings)):
        name = tensor_name(path)
        here = stacked if stacked is not None else {} if name in flat else find_stacked(name, a.shape, flat)
        layers = whole_layers({name: tuple(a.shape)}, here, sep=".")
        parts = []
        for part, layer in layers.items():
            if part not in flat:
                raise UserError(f"{where}: has no tensor {part} (shape {layer.shape} in the model)")
            x = np.asarray(flat[part])
            if tuple(x.shape) != layer.shape:
                raise UserError(f"{where}: tensor {part} has shape {tuple(x.shape)}, the model's is {layer.shape}")
            parts.append(x.astype(a.dtype))
        x = parts[0] if len(parts) == 1 and next(iter(layers.values())).index is None \
            else np.stack(parts).reshape(a.shape)
        # every process holds the whole tensor: each places its own shards
        out.append(jax.make_array_from_callback(x.shape, sh, lambda index, x=x: x[index]))
    return jax.tree_util.tree_unflatten(treedef, out)
