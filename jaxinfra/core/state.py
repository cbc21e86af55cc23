"""The train state's type: what a step reads and writes and a checkpoint saves (a plain NamedTuple, no JAX)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import jax


class TrainState(NamedTuple):
    """Everything a step reads and writes (and a checkpoint saves)."""

    step: jax.Array  # int32 scalar: optimizer updates done so far
    params: Any  # nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any
    model_state: Any = {}  # the model's other variables (BatchNorm statistics, counters), same layout
