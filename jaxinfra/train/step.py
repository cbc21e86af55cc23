"""The train step: the state it reads and writes, born sharded, and the one function that plans
and compiles it (`plan_step`), used by the trainer, every benchmark and the tests alike.

The step never imports a model: it takes an NNX model factory and a loss function
`loss_fn(model, batch) -> loss` or `-> (loss, {name: scalar})`, so a user's own model walks the
same path. A model is split three ways (`ModelDef`): its Params are trained; its other variables
(BatchNorm statistics, counters, the user's own) ride in the state, updated by the forward pass in
train mode; its RNG streams (`nnx.Dropout(rate, rngs=rngs)`) are reseeded inside every step from
(seed, step, micro-batch), so randomness is the same on every mesh and a resume is bit-exact
without saving any key.
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

from jaxinfra.compress.pruning import find_prune_state, sparsity_metrics
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import path_str
from jaxinfra.core.state import TrainState
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.pipeline import stacked_modules

ModelFn = Callable[[], nnx.Module]
LossFn = Callable[[nnx.Module, Any], Any]  # -> scalar loss, or (loss, {name: scalar}) to log beside it
# What the state carries besides Params: every variable but RNG streams (reseeded per step) and
# sown intermediates (outputs of one forward pass, not state).
OTHER = nnx.Not(nnx.Any(nnx.Param, nnx.RngState, nnx.Intermediate))
# metric names the step and the reporter write themselves
RESERVED = ("step", "loss", "grad_norm", "learning_rate", "sparsity", "step_time_s", "tokens_per_sec",
            "examples_per_sec", "mfu")


class Field(NamedTuple):
    """One entry of an example: its shape and dtype, and the logical names of a batch of it
    (batch first, then one per example dimension)."""

    shape: tuple[int, ...]
    dtype: Any
    names: tuple[str | None, ...]


def example_batch(fields: Mapping[str, Field], rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A batch of `rows` examples, abstract and unsharded (to trace a loss before planning the step)."""
    return {k: jax.ShapeDtypeStruct((rows,) + tuple(f.shape), f.dtype) for k, f in fields.items()}


def split_loss(out: Any) -> tuple[Any, dict[str, Any]]:
    """loss_fn's output -> (loss, metrics to log beside it)."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return out[0], dict(out[1])
    return out, {}


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@dataclass(frozen=True)
class ModelDef:
    """A model split for the compiled step: its structure in train and eval mode (`model.train()`,
    `model.eval()`), and the abstract Params, other variables and RNG streams, with the logical
    PartitionSpecs of the first two."""

    train_def: nnx.GraphDef
    eval_def: nnx.GraphDef
    params: Any
    state: Any
    rngs: Any
    logical: Any
    state_logical: Any
    forward: Callable[[Any], Any] | None = None  # params -> what the forward pass computes with (QAT rounding)
    stacked: Any = None  # Stacked module path -> leading layer dims ({} when the model stacks no layers)

    def rng_values(self, key: jax.Array) -> Any:
        """Every RNG stream of the model seeded from `key` (one fold per stream) with its count at 0."""
        leaves, treedef = jax.tree.flatten(self.rngs)
        return jax.tree.unflatten(treedef, [jax.random.fold_in(key, i) if _is_key(x) else jnp.zeros(x.shape, x.dtype)
                                            for i, x in enumerate(leaves)])

    def module(self, params: Any, state: Any = None, *, train: bool = False, key: jax.Array | None = None
               ) -> nnx.Module:
        """The model from its arrays: train mode (dropout on, batch statistics) or eval mode."""
        rngs = self.rng_values(key if key is not None else jax.random.key(0))
        params = self.forward(params) if self.forward is not None else params
        return nnx.merge(self.train_def if train else self.eval_def, params, rngs, state if state is not None else {})

    def state_of(self, model: nnx.Module) -> Any:
        """The model's other variables after a forward pass (those it had at init, in the same layout)."""
        new = nnx.to_pure_dict(nnx.state(model, OTHER))
        if jax.tree.structure(new) != jax.tree.structure(self.state):
            have = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(self.state)[0]}
            extra = sorted({path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(new)[0]} - have)
            raise UserError(f"model_fn: the forward pass created variables {', '.join(extra[:3]) or '?'} that the "
                            f"model did not have when built: create every nnx.Variable in __init__")
        return new


def abstract_model(model_fn: ModelFn) -> ModelDef:
    """The model split and shaped without allocating anything."""
    static: dict[str, Any] = {}

    def build() -> Any:
        # jax.eval_shape rather than nnx.eval_shape: the latter resolves logical names against
        # the mesh in scope, and here they are still logical.
        with nnx.use_eager_sharding(False):
            model = model_fn()
            if not isinstance(model, nnx.Module):
                raise UserError(f"model_fn returned {type(model).__name__}, not a flax.nnx.Module")
            model.train()  # Flax's default, said explicitly: a model_fn may build it in eval mode
            graphdef, params, rngs, state = nnx.split(model, nnx.Param, nnx.RngState, OTHER)
            model.eval()
            static["eval_def"] = nnx.split(model, nnx.Param, nnx.RngState, OTHER)[0]
        static["train_def"] = graphdef
        static["stacked"] = stacked_modules(model)
        static["logical"] = nnx.to_pure_dict(nnx.get_partition_spec(params))
        static["state_logical"] = nnx.to_pure_dict(nnx.get_partition_spec(state))
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rngs), nnx.to_pure_dict(state)

    params, rngs, state = jax.eval_shape(build)
    return ModelDef(static["train_def"], static["eval_def"], params, state, rngs, static["logical"],
                    static["state_logical"], stacked=static["stacked"])


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


def step_key(seed: int, step: jax.Array, micro: int | jax.Array = 0) -> jax.Array:
    """The random key of one (micro-)batch: a function of (seed, step, micro-batch) only, so the same
    on any mesh and process count, and after a resume (threefry keys are partitionable)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro)


def make_train_step(model: ModelDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, accum: int = 1, seed: int = 0
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step: grads (summed over `accum` micro-batches, the batch's leading dim), update.
    Other variables (batch statistics) pass from one micro-batch's forward pass to the next."""
    def forward(params: Any, state: Any, key: jax.Array, batch: Any) -> tuple[jax.Array, tuple[dict, Any]]:
        module = model.module(params, state, train=True, key=key)
        loss, aux = split_loss(loss_fn(module, batch))
        return loss, (aux, model.state_of(module))
    grad_fn = jax.value_and_grad(forward, has_aux=True)

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        if accum == 1:
            (loss, (aux, model_state)), grads = grad_fn(state.params, state.model_state,
                                                         step_key(seed, state.step), batch)
        else:
            def micro(carry: Any, xs: Any) -> tuple[Any, None]:
                total, model_state = carry
                i, micro_batch = xs
                (loss, (aux, model_state)), grads = grad_fn(state.params, model_state,
                                                             step_key(seed, state.step, i), micro_batch)
                return (jax.tree.map(jnp.add, total, (loss, aux, grads)), model_state), None
            shapes = jax.eval_shape(grad_fn, state.params, state.model_state, step_key(seed, state.step),
                                    jax.tree.map(lambda x: x[0], batch))
            zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (shapes[0][0], shapes[0][1][0], shapes[1]))
            (total, model_state), _ = jax.lax.scan(micro, (zero, state.model_state), (jnp.arange(accum), batch))
            loss, aux, grads = jax.tree.map(lambda x: x / accum, total)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The reporter stops the run on a non-finite loss or gradient norm: moments are averages of
        # gradients and their squares, so they overflow only after the gradient norm has; the saver
        # checks the whole state before writing it. (A per-step flag over the whole state cost up to
        # 15% of a step on 8 simulated devices: one reduction and all-reduce per leaf.)
        metrics = {**aux, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        pruned = find_prune_state(opt_state)  # anywhere in the state: prune may sit inside a chain
        if pruned is not None:
            metrics.update(sparsity_metrics(pruned))  # counted when the masks changed: no pass per step
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return TrainState(state.step + 1, params, opt_state, model_state), metrics

    return train_step


def make_eval_step(model: ModelDef, eval_fn: Callable[[nnx.Module, Any], Any], mesh: Mesh
                   ) -> Callable[[Any, Any, Any], Any]:
    """Jitted eval_fn(model in eval mode, batch) of (params, model_state, batch), each input on its own
    sharding (a shorter last batch compiles once more): no gradient, nothing donated."""
    return jax.jit(lambda p, s, b: eval_fn(model.module(p, s), b), out_shardings=shd.replicated(mesh))


@dataclass(frozen=True)
class StepPlan:
    """The train state's structure and shardings and the batch's, checked before anything is
    allocated; `init()` makes the born-sharded state, `compile()` the step."""

    model_fn: ModelFn
    tx: optax.GradientTransformation
    mesh: Mesh
    model: ModelDef
    abstract: TrainState  # ShapeDtypeStructs carrying their shardings: restore targets
    shardings: TrainState  # NamedSharding per leaf
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]  # the pure step
    batch_shardings: dict[str, NamedSharding]  # of a step's batch (micro-batches leading when accum > 1)
    micro_shardings: dict[str, NamedSharding]  # of one (micro-)batch: eval batches, loss checks
    batch: dict[str, jax.ShapeDtypeStruct]  # a step's batch, abstract
    micro: dict[str, jax.ShapeDtypeStruct]  # one micro-batch, abstract

    @property
    def graphdef(self) -> nnx.GraphDef:
        """The model's structure in eval mode (merge with params alone when it has no other variables)."""
        return self.model.eval_def

    @property
    def logical(self) -> Any:
        """Logical PartitionSpec per parameter."""
        return self.model.logical

    def init(self) -> tuple[TrainState, Any]:
        """(state, compiled initialiser): eval_shape -> shardings -> jit(init, out_shardings), so no
        device ever holds more than its shards (`memory_analysis()` of the initialiser shows it)."""
        model_fn = self.model_fn

        def init_model() -> tuple[Any, Any]:
            with nnx.use_eager_sharding(False):
                _, params, state = nnx.split(model_fn(), nnx.Param, OTHER, ...)[:3]
                return nnx.to_pure_dict(params), nnx.to_pure_dict(state)

        # The initialiser takes no inputs, so every weight is a compile-time constant: XLA's GPU constant
        # folding then evaluates the RNG on the host (over 3 minutes for 1B parameters on an H200).
        init_compiled = jax.jit(init_model, out_shardings=(self.shardings.params, self.shardings.model_state)
                                ).lower().compile(compiler_options={"xla_disable_hlo_passes": "constant_folding"})
        params, model_state = init_compiled()
        return self.start_from(params, model_state), init_compiled

    def start_from(self, params: Any, model_state: Any) -> TrainState:
        """Step 0 from given (sharded) model arrays: a fresh optimizer state."""
        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.shardings.step)
        return TrainState(step, params, opt_state, model_state)

    def compile(self) -> Any:
        """The step jitted with explicit in/out shardings and the state donated, compiled ahead of the loop."""
        jitted = jax.jit(self.step_fn, in_shardings=(self.shardings, self.batch_shardings),
                         out_shardings=(self.shardings, shd.replicated(self.mesh)), donate_argnums=(0,))
        return jitted.lower(self.abstract, self.batch).compile()


def plan_step(model_fn: ModelFn, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules,
              batch: Mapping[str, Field], *, accum: int = 1, batch_size: int, schedule: optax.Schedule | None = None,
              allowed_unused: Sequence[str] | None = None, seed: int = 0, model: ModelDef | None = None) -> StepPlan:
    """Shapes and shardings of the whole train state and batch, checked, without allocating anything.

    `batch` describes one example per entry (shape, dtype, logical names of a batch of it); a step's
    batch holds `batch_size` examples, as `accum` micro-batches on a leading axis when accum > 1.
    Checks: every logical name has a rule, every sharded dimension divides and, unless
    `allowed_unused` is None, every rule but those it names is used by a parameter. `seed` seeds the
    model's RNG streams (with the step); `model` is abstract_model(model_fn) when already computed.
    """
    model = model if model is not None else abstract_model(model_fn)
    if allowed_unused is not None:
        shd.check_rules_used(rules, model.logical, allowed_unused)
    param_sh = shd.tree_shardings(model.logical, mesh, rules)
    shd.check_divisible(model.params, param_sh, model.logical)
    state_sh = shd.tree_shardings(model.state_logical, mesh, rules)
    shd.check_divisible(model.state, state_sh, model.state_logical)
    opt_sh = opt_state_shardings(tx, model.params, param_sh, mesh)
    shardings = TrainState(shd.replicated(mesh), param_sh, opt_sh, state_sh)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), model.params, jax.eval_shape(tx.init, model.params),
                        model.state)
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    lead_names, lead_shape = ((None,), (accum, batch_size // accum)) if accum > 1 else ((), (batch_size,))
    batch_sh = {k: shd.named(mesh, lead_names + tuple(f.names), rules) for k, f in batch.items()}
    micro_sh = {k: shd.named(mesh, tuple(f.names), rules) for k, f in batch.items()}
    canon = lambda d: jax.dtypes.canonicalize_dtype(np.dtype(d))
    batch_abstract = {k: jax.ShapeDtypeStruct(lead_shape + tuple(f.shape), canon(f.dtype), sharding=batch_sh[k])
                      for k, f in batch.items()}
    micro = {k: jax.ShapeDtypeStruct((batch_size // accum,) + tuple(f.shape), canon(f.dtype), sharding=micro_sh[k])
             for k, f in batch.items()}
    return StepPlan(model_fn, tx, mesh, model, targets, shardings,
                    make_train_step(model, loss_fn, tx, schedule, accum, seed), batch_sh, micro_sh, batch_abstract,
                    micro)


def build_model(model_fn: ModelFn, mesh: Mesh, rules: shd.Rules) -> nnx.Module:
    """The model of `model_fn`, built outside the trainer with every variable born sharded on `mesh`
    by its logical axis names and `rules` (no device ever holds a whole sharded weight)."""
    model = abstract_model(model_fn)

    def init() -> tuple[Any, Any, Any]:
        with nnx.use_eager_sharding(False):  # logical names stay metadata; out_shardings place the arrays
            _, params, rngs, state = nnx.split(model_fn(), nnx.Param, nnx.RngState, OTHER)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rngs), nnx.to_pure_dict(state)

    shardings = (shd.tree_shardings(model.logical, mesh, rules), shd.replicated(mesh),
                 shd.tree_shardings(model.state_logical, mesh, rules))
    with jax.set_mesh(mesh):
        params, rngs, state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(model.train_def, params, rngs, state)
