"""Shared test helpers: the default model's sharded state and compiled steps on a mesh."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxinfra import sharding as shd
from jaxinfra import train
from jaxinfra.mesh import make_mesh
from jaxinfra.model import Transformer, lm_loss
from jaxinfra.optim import make_optimizer


def make_setup(cfg, mesh):
    """(Setup, pure step, batch shardings) for cfg's model on mesh (call inside jax.set_mesh)."""
    rules = {k: tuple(v) for k, v in cfg.mesh.rules.items()}
    constrain = shd.LogicalConstraint(mesh, rules)
    model_fn = lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.run.seed), constrain=constrain)
    tx, schedule = make_optimizer(cfg.optim, cfg.run.steps, cfg.prune)
    setup = train.init_state(model_fn, tx, mesh, rules)
    accum = cfg.optim.grad_accum
    lead = 1 if accum > 1 else 0
    batch_sh = {"tokens": NamedSharding(mesh, shd.batch_spec(rules, 2 + lead, lead))}
    step = train.make_train_step(setup.graphdef, lm_loss, tx, schedule, accum)
    return setup, step, batch_sh


def make_batch(cfg, seed=0, accum_reshape=False):
    """Random tokens of the global batch's shape (micro-batches leading when accum_reshape)."""
    B, L = cfg.data.batch_size, cfg.model.seq_len
    tokens = np.random.default_rng(seed).integers(0, 256, (B, L + 1), dtype=np.int32)
    if accum_reshape:
        tokens = tokens.reshape(cfg.optim.grad_accum, B // cfg.optim.grad_accum, L + 1)
    return tokens


def mesh_of(shape):
    """A mesh over the first prod(shape) devices."""
    return make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])


def compile_step(cfg, mesh, accum_reshape=False):
    """(compiled step, setup, batch shardings); call inside jax.set_mesh(mesh)."""
    setup, step, batch_sh = make_setup(cfg, mesh)
    tokens = make_batch(cfg, accum_reshape=accum_reshape)
    example = {"tokens": jax.ShapeDtypeStruct(tokens.shape, jnp.int32, sharding=batch_sh["tokens"])}
    return train.compile_train_step(step, setup, batch_sh, example), setup, batch_sh


def run_steps(cfg, mesh_shape, n=2, accum_reshape=False, same_batch=False):
    """n steps on batches of seeds 0..n-1 (or seed 0 throughout): (gathered params, losses, state, setup)."""
    mesh = mesh_of(mesh_shape)
    with jax.set_mesh(mesh):
        compiled, setup, batch_sh = compile_step(cfg, mesh, accum_reshape)
        state, losses = setup.state, []
        for i in range(n):
            tokens = make_batch(cfg, seed=0 if same_batch else i, accum_reshape=accum_reshape)
            state, metrics = compiled(state, {"tokens": jax.device_put(tokens, batch_sh["tokens"])})
            losses.append(float(metrics["loss"]))
        return shd.gather(state.params), losses, state, setup
