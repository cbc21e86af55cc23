"""The yardstick: a minimal hand-written flax + optax jax.jit train step of the same model.

No jaxinfra trainer code: parameters placed with flax's own logical-to-mesh helper, one jitted
step with donation, a bare Python loop. jaxinfra's overhead is measured against this.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import linen, nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_baseline(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
                  rules: dict[str, tuple[str, ...]]) -> tuple[Callable, Any, Any, NamedSharding]:
    """(jitted step(params, opt_state, tokens) -> (params, opt_state, loss), params, opt_state, batch sharding)."""
    flax_rules = [(name, axes if axes else None) for name, axes in rules.items()]

    def init() -> Any:
        with nnx.use_eager_sharding(False):
            return nnx.state(model_fn(), nnx.Param)

    graphdef, abstract = jax.eval_shape(lambda: nnx.split(_unsharded(model_fn), nnx.Param))
    specs = nnx.get_partition_spec(abstract)
    param_sh = linen.logical_to_mesh_sharding(specs, mesh, flax_rules)
    params = jax.jit(init, out_shardings=param_sh).lower().compile(  # see step.StepPlan.init
        compiler_options={"xla_disable_hlo_passes": "constant_folding"})()
    rep = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_sh,
                                   transform_non_params=lambda _: rep)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    batch_sh = NamedSharding(mesh, P(tuple(a for a in rules["batch"] if a in mesh.shape) or None, None))

    def step(params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        def loss_fn(p: Any) -> jax.Array:
            logits = nnx.merge(graphdef, p)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, in_shardings=(param_sh, opt_sh, batch_sh), out_shardings=(param_sh, opt_sh, rep),
                     donate_argnums=(0, 1))
    return jitted, params, opt_state, batch_sh


def _unsharded(model_fn: Callable[[], nnx.Module]) -> nnx.Module:
    with nnx.use_eager_sharding(False):
        return model_fn()
