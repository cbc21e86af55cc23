"""Model-agnostic training: state born sharded, one pure jitted train step, the dispatch loop.

The trainer never imports a model: it takes an NNX model factory and a loss function
`loss_fn(model, batch) -> scalar`, so a user's own model walks the same path.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxinfra import sharding as shd
from jaxinfra.pruning import PruneState, sparsity_metrics

ModelFn = Callable[[], nnx.Module]
LossFn = Callable[[nnx.Module, Any], jax.Array]


class TrainState(NamedTuple):
    """Everything a step reads and writes (and a checkpoint saves)."""

    step: jax.Array  # int32 scalar: optimizer updates done so far
    params: Any  # nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any


class Diverged(RuntimeError):
    """The loss became NaN or Inf."""


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


class Plan(NamedTuple):
    """The state's structure and shardings, before (or instead of) allocating it."""

    graphdef: nnx.GraphDef
    abstract: TrainState  # ShapeDtypeStructs carrying their shardings: restore targets
    shardings: TrainState  # NamedSharding per leaf
    logical: Any  # logical PartitionSpec per parameter


class Setup(NamedTuple):
    """A born-sharded state and what the step needs to know about it."""

    graphdef: nnx.GraphDef
    state: TrainState
    shardings: TrainState  # NamedSharding per leaf of `state`
    logical: Any  # logical PartitionSpec per parameter
    init_compiled: Any  # the compiled parameter initialiser (memory_analysis for reports); None if restored


def plan_state(model_fn: ModelFn, tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules,
               allowed_unused: Any = None) -> Plan:
    """Shapes and shardings of the whole train state, checked, without allocating anything.

    Checks: every logical name has a rule, every sharded dimension divides and, unless
    `allowed_unused` is None, every rule but those it names is used by a parameter.
    """
    graphdef, abstract, logical = abstract_model(model_fn)
    if allowed_unused is not None:
        shd.check_rules_used(rules, logical, allowed_unused)
    param_sh = shd.tree_shardings(logical, mesh, rules)
    shd.check_divisible(abstract, param_sh, logical)
    opt_sh = opt_state_shardings(tx, abstract, param_sh, mesh)
    rep = shd.replicated(mesh)
    shardings = TrainState(rep, param_sh, opt_sh)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract, jax.eval_shape(tx.init, abstract))
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return Plan(graphdef, targets, shardings, logical)


def init_state(model_fn: ModelFn, tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules,
               allowed_unused: Any = None, plan: Plan | None = None) -> Setup:
    """eval_shape -> shardings -> jit(init, out_shardings): no device holds more than its shards."""
    plan = plan or plan_state(model_fn, tx, mesh, rules, allowed_unused)

    def init_params() -> Any:
        with nnx.use_eager_sharding(False):
            return nnx.to_pure_dict(nnx.state(model_fn(), nnx.Param))

    # The initialiser takes no inputs, so every weight is a compile-time constant: XLA's GPU constant
    # folding then evaluates the RNG on the host (over 3 minutes for 1B parameters on an H200).
    init_compiled = jax.jit(init_params, out_shardings=plan.shardings.params).lower().compile(
        compiler_options={"xla_disable_hlo_passes": "constant_folding"})
    params = init_compiled()
    opt_state = jax.jit(tx.init, out_shardings=plan.shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), plan.shardings.step)
    return Setup(plan.graphdef, TrainState(step, params, opt_state), plan.shardings, plan.logical, init_compiled)


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
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if isinstance(opt_state, PruneState):
            metrics.update(sparsity_metrics(opt_state))  # counted when the masks changed: no pass per step
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def compile_train_step(step_fn: Callable, plan: Plan | Setup, batch_sharding: Any, example_batch: Any) -> Any:
    """jit with explicit in/out shardings and the state donated, compiled ahead of the loop."""
    rep = shd.replicated(next(iter(jax.tree.leaves(plan.shardings))).mesh)
    abstract = plan.abstract if isinstance(plan, Plan) else plan.state
    jitted = jax.jit(step_fn, in_shardings=(plan.shardings, batch_sharding),
                     out_shardings=(plan.shardings, rep), donate_argnums=(0,))
    return jitted.lower(abstract, example_batch).compile()


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn, param_shardings: Any, batch_sharding: Any,
                   mesh: Mesh) -> Callable[[Any, Any], jax.Array]:
    """Jitted loss of params on one batch (no gradient, params not donated)."""
    return jax.jit(lambda p, b: loss_fn(nnx.merge(graphdef, p), b),
                   in_shardings=(param_shardings, batch_sharding), out_shardings=shd.replicated(mesh))


def fit(state: TrainState, step_fn: Callable, batches: Iterator[Any], *, steps: int, tokens_per_step: int,
        log: Callable[[int, dict[str, float]], None], eval_every: int = 0,
        evaluate: Callable[[TrainState, int], None] | None = None,
        on_step: Callable[[TrainState, int], bool] | None = None) -> TrainState:
    """Dispatch step N+1, then fetch step N's metrics, so the device never waits on the host.

    `log(step, metrics)` receives every completed step's metrics (step counts updates done);
    `evaluate(state, step)` runs every `eval_every` steps and after the last one;
    `on_step(state, step)` runs after each dispatch (checkpoints, preemption) and returns True
    to stop early. All hooks run outside the compiled step.
    """
    start = int(jax.device_get(state.step))
    pending: tuple[int, dict[str, jax.Array]] | None = None
    last_done = time.perf_counter()

    def finish(item: tuple[int, dict[str, jax.Array]]) -> None:
        nonlocal last_done
        done, metrics = item
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if not math.isfinite(values["loss"]):
            raise Diverged(f"loss became {values['loss']} at step {done}; lower optim.lr or check the data")
        values["step_time_s"] = now - last_done
        values["tokens_per_sec"] = tokens_per_step / max(now - last_done, 1e-9)
        last_done = now
        log(done, values)

    for index in range(start, steps):
        batch = next(batches)  # host work overlaps the step still running on the device
        state, metrics = step_fn(state, batch)
        if pending is not None:
            finish(pending)
        pending = (index + 1, metrics)
        if evaluate is not None and ((eval_every and (index + 1) % eval_every == 0) or index + 1 == steps):
            finish(pending)
            pending = None
            evaluate(state, index + 1)
            last_done = time.perf_counter()  # evaluation time is not step time
        if on_step is not None and on_step(state, index + 1):
            break
    if pending is not None:
        finish(pending)
    return state
