"""The train step: the state it reads and writes, born sharded, and the one function that plans
and compiles it (`plan_step`), used by the trainer, every benchmark and the tests alike.

The step never imports a model: it takes an NNX model factory and a loss function
`loss_fn(model, batch) -> scalar`, so a user's own model walks the same path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxinfra import sharding as shd
from jaxinfra.pruning import find_prune_state, sparsity_metrics

ModelFn = Callable[[], nnx.Module]
LossFn = Callable[[nnx.Module, Any], jax.Array]


class TrainState(NamedTuple):
    """Everything a step reads and writes (and a checkpoint saves)."""

    step: jax.Array  # int32 scalar: optimizer updates done so far
    params: Any  # nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any


class Field(NamedTuple):
    """One entry of an example: its shape and dtype, and the logical names of a batch of it
    (batch first, then one per example dimension)."""

    shape: tuple[int, ...]
    dtype: Any
    names: tuple[str | None, ...]


def abstract_model(model_fn: ModelFn) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract params, logical PartitionSpecs) without allocating anything."""
    static: dict[str, Any] = {}

    def build() -> Any:
        # jax.eval_shape rather than nnx.eval_shape: the latter resolves logical names against
        # the mesh in scope, and here they are still logical.
        with nnx.use_eager_sharding(False):
            graphdef, params, rest = nnx.split(model_fn(), nnx.Param, ...)
        static["graphdef"], static["rest"] = graphdef, jax.tree.leaves(rest)
        static["logical"] = nnx.to_pure_dict(nnx.get_partition_spec(params))
        return nnx.to_pure_dict(params)

    abstract = jax.eval_shape(build)
    if static["rest"]:
        raise ValueError("model_fn: the model holds non-Param state, which this trainer does not carry yet")
    return static["graphdef"], abstract, static["logical"]


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Moments shard like their parameters; scalars and factored (differently shaped) leaves replicate."""
    rep = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(
        tx, lambda leaf, p, s: s if leaf.shape == p.shape else rep,
        abstract_opt, abstract_params, param_shardings, transform_non_params=lambda _: rep)


def all_finite(tree: Any) -> jax.Array:
    """Whether every float leaf of `tree` is finite (one jitted pass over the devices' shards)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, accum: int = 1
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step: grads (summed over `accum` micro-batches, the batch's leading dim), update."""
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b))

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        if accum == 1:
            loss, grads = grad_fn(state.params, batch)
        else:
            def micro(carry: Any, micro_batch: Any) -> tuple[Any, None]:
                return jax.tree.map(jnp.add, carry, grad_fn(state.params, micro_batch)), None
            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(micro, zero, batch)
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The reporter stops the run on a non-finite loss or gradient norm: moments are averages of
        # gradients and their squares, so they overflow only after the gradient norm has; the saver
        # checks the whole state before writing it. (A per-step flag over the whole state cost up to
        # 15% of a step on 8 simulated devices: one reduction and all-reduce per leaf.)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        pruned = find_prune_state(opt_state)  # anywhere in the state: prune may sit inside a chain
        if pruned is not None:
            metrics.update(sparsity_metrics(pruned))  # counted when the masks changed: no pass per step
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, eval_fn: Callable[[nnx.Module, Any], Any], param_shardings: Any,
                   batch_sharding: Any, mesh: Mesh) -> Callable[[Any, Any], Any]:
    """Jitted eval_fn of params on one batch (no gradient, params not donated)."""
    return jax.jit(lambda p, b: eval_fn(nnx.merge(graphdef, p), b),
                   in_shardings=(param_shardings, batch_sharding), out_shardings=shd.replicated(mesh))


@dataclass(frozen=True)
class StepPlan:
    """The train state's structure and shardings and the batch's, checked before anything is
    allocated; `init()` makes the born-sharded state, `compile()` the step."""

    model_fn: ModelFn
    tx: optax.GradientTransformation
    mesh: Mesh
    graphdef: nnx.GraphDef
    abstract: TrainState  # ShapeDtypeStructs carrying their shardings: restore targets
    shardings: TrainState  # NamedSharding per leaf
    logical: Any  # logical PartitionSpec per parameter
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]  # the pure step
    batch_shardings: dict[str, NamedSharding]  # of a step's batch (micro-batches leading when accum > 1)
    micro_shardings: dict[str, NamedSharding]  # of one (micro-)batch: eval batches, loss checks
    batch: dict[str, jax.ShapeDtypeStruct]  # a step's batch, abstract
    micro: dict[str, jax.ShapeDtypeStruct]  # one micro-batch, abstract

    def init(self) -> tuple[TrainState, Any]:
        """(state, compiled initialiser): eval_shape -> shardings -> jit(init, out_shardings), so no
        device ever holds more than its shards (`memory_analysis()` of the initialiser shows it)."""
        model_fn = self.model_fn

        def init_params() -> Any:
            with nnx.use_eager_sharding(False):
                return nnx.to_pure_dict(nnx.state(model_fn(), nnx.Param))

        # The initialiser takes no inputs, so every weight is a compile-time constant: XLA's GPU constant
        # folding then evaluates the RNG on the host (over 3 minutes for 1B parameters on an H200).
        init_compiled = jax.jit(init_params, out_shardings=self.shardings.params).lower().compile(
            compiler_options={"xla_disable_hlo_passes": "constant_folding"})
        params = init_compiled()
        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.shardings.step)
        return TrainState(step, params, opt_state), init_compiled

    def compile(self) -> Any:
        """The step jitted with explicit in/out shardings and the state donated, compiled ahead of the loop."""
        jitted = jax.jit(self.step_fn, in_shardings=(self.shardings, self.batch_shardings),
                         out_shardings=(self.shardings, shd.replicated(self.mesh)), donate_argnums=(0,))
        return jitted.lower(self.abstract, self.batch).compile()


def plan_step(model_fn: ModelFn, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules,
              batch: Mapping[str, Field], *, accum: int = 1, batch_size: int, schedule: optax.Schedule | None = None,
              allowed_unused: Sequence[str] | None = None) -> StepPlan:
    """Shapes and shardings of the whole train state and batch, checked, without allocating anything.

    `batch` describes one example per entry (shape, dtype, logical names of a batch of it); a step's
    batch holds `batch_size` examples, as `accum` micro-batches on a leading axis when accum > 1.
    Checks: every logical name has a rule, every sharded dimension divides and, unless
    `allowed_unused` is None, every rule but those it names is used by a parameter.
    """
    graphdef, abstract, logical = abstract_model(model_fn)
    if allowed_unused is not None:
        shd.check_rules_used(rules, logical, allowed_unused)
    param_sh = shd.tree_shardings(logical, mesh, rules)
    shd.check_divisible(abstract, param_sh, logical)
    opt_sh = opt_state_shardings(tx, abstract, param_sh, mesh)
    shardings = TrainState(shd.replicated(mesh), param_sh, opt_sh)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract, jax.eval_shape(tx.init, abstract))
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    lead_names, lead_shape = ((None,), (accum, batch_size // accum)) if accum > 1 else ((), (batch_size,))
    batch_sh = {k: shd.named(mesh, lead_names + tuple(f.names), rules) for k, f in batch.items()}
    micro_sh = {k: shd.named(mesh, tuple(f.names), rules) for k, f in batch.items()}
    canon = lambda d: jax.dtypes.canonicalize_dtype(np.dtype(d))
    batch_abstract = {k: jax.ShapeDtypeStruct(lead_shape + tuple(f.shape), canon(f.dtype), sharding=batch_sh[k])
                      for k, f in batch.items()}
    micro = {k: jax.ShapeDtypeStruct((batch_size // accum,) + tuple(f.shape), canon(f.dtype), sharding=micro_sh[k])
             for k, f in batch.items()}
    return StepPlan(model_fn, tx, mesh, graphdef, targets, shardings, logical,
                    make_train_step(graphdef, loss_fn, tx, schedule, accum), batch_sh, micro_sh, batch_abstract, micro)
