"""Evaluation: the held-out batches placed once (every example, a shorter last batch weighted by
its size so the means are exact), the default eval_fn from the loss, and when it is due."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxinfra.core.state import TrainState
from jaxinfra.data import sources as data_lib
from jaxinfra.parallel import sharding as shd
from jaxinfra.train.step import LossFn, split_loss

if TYPE_CHECKING:
    from jaxinfra.settings.sections import Config

EvalFn = Callable[[nnx.Module, Any], Mapping[str, jax.Array]]


def loss_eval(loss_fn: LossFn) -> EvalFn:
    """The default eval_fn: loss_fn's loss and metrics, on the model in eval mode."""
    def eval_fn(model: nnx.Module, batch: Any) -> dict[str, jax.Array]:
        loss, aux = split_loss(loss_fn(model, batch))
        return {"loss": loss, **aux}
    return eval_fn


class Evaluator:
    """Runs `evaluate(state) -> {eval_name: value}` every `every` steps and after the last step."""

    def __init__(self, evaluate: Callable[[TrainState], dict[str, float]], every: int, last_step: int):
        self.evaluate, self.every, self.last_step = evaluate, every, last_step

    def due(self, step: int) -> bool:
        """Whether an evaluation follows `step`."""
        return bool(self.every and step % self.every == 0) or step == self.last_step

    def run(self, state: TrainState) -> dict[str, float]:
        """The row of this evaluation."""
        return self.evaluate(state)


def mean_eval(eval_step: Callable[[Any, Any, Any], Any], batches: list[tuple[Any, int]]
              ) -> Callable[[TrainState], dict[str, float]]:
    """`evaluate` for an Evaluator: eval_step's outputs (means over a batch) averaged over fixed
    (batch, examples) pairs weighted by their examples, so a shorter last batch counts exactly."""
    def evaluate(state: TrainState) -> dict[str, float]:
        outs = [(jax.device_get(eval_step(state.params, state.model_state, b)), n) for b, n in batches]
        keys = sorted(outs[0][0], key=lambda k: (k != "loss", k))
        total = sum(n for _, n in outs)
        return {f"eval_{k}": sum(float(o[k]) * n for o, n in outs) / total for k in keys}
    return evaluate


def place(host: list[dict[str, np.ndarray]], shardings: Any, mesh: Mesh, divisor: int) -> list[tuple[Any, int]]:
    """(global batch, examples) for each host batch; a shorter last batch that the batch axes cannot
    split is placed whole on every device (its step compiles once more, at its own shape)."""
    out = []
    for batch in host:
        n = len(next(iter(batch.values())))
        out.append((data_lib.from_host(batch, shardings if n % divisor == 0 else shd.replicated(mesh)), n))
    return out


def eval_summary(host: list[dict[str, np.ndarray]], available: int, cfg: Config) -> str:
    """The start-up line: how many examples each evaluation covers, and what run.eval_batches leaves out."""
    rows = [len(next(iter(b.values()))) for b in host]
    line = f"evaluation: {sum(rows):,} examples in {len(rows)} batches" + \
        (f" (the last of {rows[-1]})" if rows[-1] != rows[0] else "")
    if sum(rows) < available:
        line += (f"; {available - sum(rows):,} of eval_source's {available:,} are left out by run.eval_batches="
                 f"{cfg.run.eval_batches} x data.eval_batch_size={cfg.data.eval_batch}: raise run.eval_batches "
                 f"to cover them")
    return line
