"""The caller's side of train_model: the options it takes beyond the config, model, loss and data, and what
on_finish receives after the last step."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import optax
from flax import nnx
from jax.sharding import Mesh

from jaxinfra.core.state import TrainState
from jaxinfra.train.evaluation import EvalFn
from jaxinfra.train.step import ModelDef


class Finished(NamedTuple):
    """What `on_finish` receives after the last step (inside the mesh scope)."""

    graphdef: nnx.GraphDef  # the model in eval mode (nnx.merge with state.params when it has no other variables)
    state: TrainState
    mesh: Mesh
    rules: dict[str, tuple[str, ...]]
    final: dict[str, Any]  # the figures train_model returns; on_finish may add to them
    model: ModelDef  # model.module(state.params, state.model_state) rebuilds the trained module


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """What `train_model` takes beyond the config, the model, the loss and the data; each field optional.

    mesh: the device mesh (default: cfg.mesh's). example_spec: {key: (shape, dtype)} every example must
    match (default: the first example's). batch_axes: logical names of each batch entry's dimensions
    (default: ("batch", None, ...)). eval_fn(model, batch) -> dict of means over the batch, averaged over
    every eval example (default: loss_fn's loss and metrics); the model is in eval mode. optimizer:
    (tx, schedule) instead of the one built from cfg.optim and cfg.prune (wrapped in prune.* unless it
    prunes already). tokens_per_example and flops_per_token give tokens_per_sec and MFU, against the
    matmul peak in compute_dtype unless cfg.run.peak_flops gives it. rounds_inputs: the model rounds its
    own matmul inputs to int8 (what quant.activations=int8 needs). resume_keys: {meta key: (config name,
    value)} a resumed run must keep (batch size and seed always). on_finish(Finished) runs after the last
    step, inside the mesh scope, before the final exports.
    """

    mesh: Mesh | None = None
    example_spec: Mapping[str, tuple[Sequence[int], Any]] | None = None
    batch_axes: Mapping[str, Sequence[str | None]] | None = None
    eval_fn: EvalFn | None = None
    optimizer: tuple[optax.GradientTransformation, optax.Schedule | None] | None = None
    tokens_per_example: int = 1
    flops_per_token: float = 0.0
    compute_dtype: str = "float32"
    rounds_inputs: bool = False
    resume_keys: Mapping[str, tuple[str, Any]] | None = None
    on_finish: Callable[[Finished], None] | None = None
