"""Only the mesh utilities, inside your own jax.jit training loop (no jaxinfra trainer, no Flax).

A two-layer MLP regression in plain JAX: jaxinfra builds the (data, fsdp, tensor) mesh, turns
logical axis names into shardings through a rules table, and places parameters and batches on
it; the loop, the loss and the SGD update are yours.

    python examples/mesh_only.py [--steps N]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

import jaxinfra  # noqa: E402

# Your logical names -> mesh axes: the one table that decides what is split across devices.
RULES = {"batch": ("data", "fsdp"), "inputs": ("fsdp",), "hidden": ("tensor",), "outputs": ()}
LOGICAL = {"w1": ("inputs", "hidden"), "w2": ("hidden", "outputs")}


def main(argv: list[str] | None = None) -> int:
    """Fit y = tanh(x A) B on a (2, 2, 2) mesh with plain jax.jit; prints the loss and the shardings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    jaxinfra.use_cpu_devices(8)  # before anything asks JAX for devices
    import jax
    import jax.numpy as jnp
    import numpy as np

    mesh = jaxinfra.make_mesh(data=2, fsdp=2, tensor=2)
    print(jaxinfra.describe(mesh))
    param_sh = jaxinfra.tree_shardings(LOGICAL, mesh, RULES)
    batch_sh = jax.sharding.NamedSharding(mesh, jaxinfra.logical_to_spec(("batch", None), RULES))

    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(16, 32)) / 4, rng.normal(size=(32, 4)) / 6  # the function to learn
    params = jaxinfra.shard({"w1": rng.normal(size=(16, 32)).astype(np.float32) / 4,
                             "w2": np.zeros((32, 4), np.float32)}, param_sh)

    def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)

    @jax.jit  # shardings come from the arguments; out_shardings keeps parameters where they live
    def step(params: dict, x: jax.Array, y: jax.Array) -> tuple[dict, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        new = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        return jax.lax.with_sharding_constraint(new, param_sh), loss

    first = last = None
    for i in range(args.steps):
        x = rng.normal(size=(64, 16)).astype(np.float32)
        y = (np.tanh(x @ A) @ B).astype(np.float32)
        params, loss = step(params, jaxinfra.shard(x, batch_sh), jaxinfra.shard(y, batch_sh))
        if i == 0:
            first = float(loss)
        last = float(loss)
        if (i + 1) % 50 == 0:
            print(f"step {i + 1}: loss {last:.5f}")
    print(f"w1 {params['w1'].sharding.spec}, w2 {params['w2'].sharding.spec}; "
          f"per-device shard of w1 {params['w1'].addressable_shards[0].data.shape}")
    print(f"loss {first:.5f} -> {last:.5f}")
    whole = jaxinfra.gather(params)  # whole host arrays again (a collective across processes)
    print(f"gathered w1 {whole['w1'].shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
