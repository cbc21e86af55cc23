"""The user's inputs to train_model checked before anything compiles, each failure one UserError naming what to fix:
batch sizes against the mesh and the processes, logical axes the rules do not map, what loss_fn and eval_fn return,
the logical names of each batch entry."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

from jaxinfra.core.errors import UserError
from jaxinfra.core.names import path_str
from jaxinfra.settings.sections import Config
from jaxinfra.train.step import (
    RESERVED,
    Field,
    ModelDef,
    split_loss,
)


def check_batch(cfg: Config, divisor: int) -> None:
    """The (micro-)batch and the eval batch must split over the batch mesh axes and the processes."""
    micro = cfg.data.batch_size // cfg.optim.grad_accum
    if divisor % jax.process_count():
        raise UserError(f"the batch mesh axes split the batch {divisor} ways, fewer than (or not a multiple of) "
                        f"the {jax.process_count()} processes: each process must own distinct rows; "
                        f"put data or fsdp across processes")
    for n, what in ((divisor, f"the batch mesh axes ({'x'.join(cfg.mesh.rules.get('batch', [])) or 'none'}) "
                               f"= {divisor}"),
                    (jax.process_count(), f"the {jax.process_count()} processes")):
        if micro % n:
            raise UserError(f"data.batch_size={cfg.data.batch_size} / optim.grad_accum={cfg.optim.grad_accum} "
                            f"= {micro} is not divisible by {what}")
    E = cfg.data.eval_batch_size
    if E and (E % divisor or E % jax.process_count()):
        raise UserError(f"data.eval_batch_size={E} is not divisible by the batch mesh axes ({divisor} ways) and the "
                        f"{jax.process_count()} processes")


def check_logical(logical: Any, rules: Mapping[str, Any], what: str = "parameter") -> None:
    """Every logical axis a variable names needs a rule: name the variable and the axis."""
    flat, _ = jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for path, spec in flat:
        for entry in spec:
            for name in entry if isinstance(entry, tuple) else (entry,):
                if name is not None and name not in rules:
                    raise UserError(
                        f"model_fn: {what} {path_str(path)} names logical "
                        f"axis {name!r}, which mesh.rules does not map (mapped: {', '.join(sorted(rules))}); "
                        f"add mesh.rules.{name}=[...] (mesh axes, or [] to replicate)")


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    return f"shape {shape}" if shape is not None else type(x).__name__


def _traced(fn: Callable, model: ModelDef, micro: Any, *, train: bool) -> Any:
    """fn(model, micro-batch)'s output, traced abstractly (nothing computed)."""
    return jax.eval_shape(lambda p, s, b: fn(model.module(p, s, train=train), b), model.params, model.state, micro)


def _scalars(items: list[tuple[str, Any]], what: str) -> None:
    """Each (label, output) is a scalar; UserError naming the first that is not."""
    for label, leaf in items:
        if getattr(leaf, "shape", None) != ():
            raise UserError(f"{what}{label} returned {_describe(leaf)}, expected a scalar")


def check_loss_fn(loss_fn: Callable, model: ModelDef, micro: Any) -> None:
    """loss_fn(model in train mode, batch) returns a scalar, or (scalar, {name: scalar}) under names of its own."""
    out = _traced(loss_fn, model, micro, train=True)
    if isinstance(out, tuple) and (len(out) != 2 or not isinstance(out[1], Mapping)):
        raise UserError(f"loss_fn returned a tuple of {len(out)} ({', '.join(map(_describe, out))}): return the "
                        f"loss, or (loss, {{name: scalar}}) to log metrics beside it")
    loss, aux = split_loss(out)
    taken = [k for k in aux if k in RESERVED or str(k).startswith("sparsity/")]
    if taken:
        raise UserError(f"loss_fn's metric {taken[0]!r} has the name of a metric the trainer logs itself "
                        f"({', '.join(RESERVED)}, sparsity/*): rename it")
    _scalars([("", loss)] + [(f"[1][{k!r}]", v) for k, v in aux.items()], "loss_fn")


def check_eval_fn(eval_fn: Callable, model: ModelDef, micro: Any) -> None:
    """eval_fn(model in eval mode, batch) returns a dict of scalars."""
    out = _traced(eval_fn, model, micro, train=False)
    if not isinstance(out, Mapping):
        raise UserError(f"eval_fn returned {_describe(out)}, expected a dict of scalars such as {{'loss': ...}}")
    _scalars([(f"[{k!r}]", v) for k, v in out.items()], "eval_fn")


def example_fields(spec: Mapping[str, tuple[tuple[int, ...], Any]],
                   batch_axes: Mapping[str, Sequence[str | None]] | None) -> dict[str, Field]:
    """Each example entry with the logical names of a batch of it (default: batch, then unsharded)."""
    out = {}
    for key, (shape, dtype) in spec.items():
        names = tuple((batch_axes or {}).get(key, ("batch",) + (None,) * len(shape)))
        if len(names) != len(shape) + 1:
            raise UserError(f"batch_axes[{key!r}]={names} names {len(names)} dims, but a batch of "
                            f"{key!r} has {len(shape) + 1} (batch, then {shape})")
        out[key] = Field(tuple(shape), dtype, names)
    return out
