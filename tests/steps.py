"""Shared test helpers: the default model's sharded state and compiled steps on a mesh, built
through `step.plan_step` exactly as the trainer builds them."""
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxinfra.core.state import TrainState
from jaxinfra.models.factory import model_fn
from jaxinfra.models.transformer import lm_loss
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.train import compression
from jaxinfra.train.optim import make_optimizer
from jaxinfra.train.step import (
    Field,
    StepPlan,
    abstract_model,
    example_batch,
    plan_step,
)


class Setup(NamedTuple):
    """A plan, the born-sharded state it initialised, and the compiled initialiser."""

    plan: StepPlan
    state: TrainState
    init_compiled: Any

    @property
    def graphdef(self):
        return self.plan.graphdef

    @property
    def shardings(self):
        return self.plan.shardings

    @property
    def logical(self):
        return self.plan.logical


def model_plan(cfg, mesh) -> StepPlan:
    """The default model's StepPlan for cfg on mesh (call inside jax.set_mesh)."""
    fields = {"tokens": Field((cfg.model.seq_len + 1,), np.int32, ("batch", "seq"))}
    model = abstract_model(model_fn(cfg, mesh))
    selection = None
    if cfg.prune.enabled:  # what the trainer prunes: the kernels the traced forward pass multiplies by
        micro = example_batch(fields, cfg.data.batch_size // cfg.optim.grad_accum)
        selection = compression.pruning_selection(cfg.prune, model, lm_loss, micro)
    tx, schedule = make_optimizer(cfg.optim, cfg.run.steps, cfg.prune, selection, model.stacked)
    return plan_step(model_fn(cfg, mesh), lm_loss, tx, mesh, cfg.mesh.logical_rules, fields,
                     accum=cfg.optim.grad_accum, batch_size=cfg.data.batch_size, schedule=schedule, model=model)


def make_setup(cfg, mesh):
    """(Setup, pure step, batch shardings) for cfg's model on mesh (call inside jax.set_mesh)."""
    plan = model_plan(cfg, mesh)
    return Setup(plan, *plan.init()), plan.step_fn, plan.batch_shardings


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
    setup, _, batch_sh = make_setup(cfg, mesh)
    return setup.plan.compile(), setup, batch_sh


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
