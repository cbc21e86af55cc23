"""prune.* and quant.* wired into a model for the train step: the tensors each takes (read from the traced
forward pass), the QAT forward pass that rounds weights to int8, and what a checkpoint records for int8 exports."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax

from jaxinfra.compress.pruning import erk_sparsities
from jaxinfra.compress.quant import fake_quant, kernel_dims
from jaxinfra.compress.roles import (
    Role,
    Selection,
    find_roles,
    select,
    selection_report,
)
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import path_str
from jaxinfra.settings.compression import PruneConfig, QuantConfig
from jaxinfra.train.step import ModelDef, split_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class RoundedWeights:
    """params -> the params a QAT forward pass computes with: each chosen kernel, cast to the compute
    dtype as the model casts it, rounded to int8 per output channel (straight-through). Applied to
    the sharded parameters inside the step, so each device rounds its own shard (the scales' max is
    a small all-reduce) and the model gathers the rounded weight once for both passes."""

    in_dims: tuple[tuple[str, tuple[int, ...]], ...]  # (path 'blocks/0/attn/wq', its contracted dims)
    dtype: str  # the compute dtype

    def __call__(self, params: Any) -> Any:
        dims = dict(self.in_dims)

        def one(path: tuple, w: jax.Array) -> jax.Array:
            d = dims.get(path_str(path))
            return w if d is None else fake_quant(w.astype(self.dtype), d).astype(w.dtype)
        return jax.tree_util.tree_map_with_path(one, params)


def quantized_model(q: QuantConfig, model: ModelDef, found: Mapping[str, Role], compute_dtype: str
                    ) -> tuple[ModelDef, dict[str, tuple[int, ...]]]:
    """The model whose forward pass rounds what quant.* chooses (its parameters stay float), and the
    quantized tensors with the dims they contract."""
        # the output layer too (unlike pruning's default): int8 costs it little, and it is a tenth of a
    # small model's bytes (quant.exclude=[head] keeps it float)
    selection = select(model.params, model.logical, found, q.params, q.exclude, key="quant",
                             output_layer_too=True, stacked=model.stacked)
    for name in selection.chosen:
        if found[name].kind != "kernel":
            raise UserError(f"quant.params selects {name}, which no matmul uses as a weight: int8 weights are "
                            f"matmul and conv weights")
    kernels = kernel_dims(found, selection.chosen)
    what = "int8 weights" + (" and matmul inputs" if q.activations == "int8" else "")
    layers = dict.fromkeys("/".join("*" if part.isdigit() else part for part in p.split("/")) for p in selection.chosen)
    log.info(f"quantization-aware training ({what}, one scale per output channel): {len(kernels)} tensors "
        f"({', '.join(layers)})")
    rounded = RoundedWeights(tuple((p, kernels[p.replace("/", ".")]) for p in selection.chosen), compute_dtype)
    return dataclasses.replace(model, forward=rounded), kernels


def kernels_record(found: Mapping[str, Role], compute_dtype: str) -> dict[str, Any]:
    """What a checkpoint records for int8 exports: every matmul weight and the dims it contracts, the
    dtype the forward pass casts weights to (QAT rounds the cast weight), and (QAT runs) the tensors
    it quantized."""
    return {"in_dims": kernel_dims(found, [n for n, r in found.items() if r.kind == "kernel"]),
            "compute_dtype": compute_dtype}


def model_roles(model: ModelDef, loss_fn: Callable, micro: Any) -> dict[str, Role]:
    """Each parameter's role in the model's training loss (one abstract trace)."""
    return find_roles(lambda q, s, b: split_loss(loss_fn(model.module(q, s, train=True), b))[0],
                      model.params, model.state, micro)


def pruning_selection(p: PruneConfig, model: ModelDef, loss_fn: Callable, micro: Any,
               found: Mapping[str, Role] | None = None) -> Selection:
    """The tensors prune.* takes, read from the traced forward pass (or `found`, its roles), and the
    start-up table of them."""
    found = found if found is not None else model_roles(model, loss_fn, micro)
    selection = select(model.params, model.logical, found, p.params, p.exclude, stacked=model.stacked)
    shapes = {path_str(q): x.shape for q, x in jax.tree_util.tree_flatten_with_path(model.params)[0]}
    if p.nm is not None:
        targets = {k: f"{p.pattern} along dim {d}" for k, d in selection.chosen.items()}
    elif p.distribution == "erk":
        erk = erk_sparsities([shapes[k] for k in selection.chosen], p.sparsity)
        targets = {k: f"{s:.1%}" for k, s in zip(selection.chosen, erk)}
    else:
        targets = {k: f"{p.sparsity:.1%}" + (" (global threshold)" if p.scope == "global" else "")
                   for k in selection.chosen}
    log.info("pruning:\n  " + "\n  ".join(selection_report(selection, model.params, targets)))
    return selection
