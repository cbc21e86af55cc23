"""The default Transformer's factory: cfg.model on a mesh, its activations pinned by the logical rules."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import jax
from flax import nnx

from jaxinfra.models.transformer import Transformer
from jaxinfra.parallel import sharding as shd
from jaxinfra.settings.sections import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TransformerFn:
    """Builds the default Transformer of cfg.model, its activations pinned by cfg.mesh.rules on `mesh`
    and, with quant.activations=int8, its matmul inputs rounded to int8."""

    cfg: Config
    mesh: jax.sharding.Mesh

    @property
    def rounds_inputs(self) -> bool:
        """Whether the model rounds matmul inputs itself (what train_model asks of quant.activations)."""
        return self.cfg.quant.activations == "int8"

    def __call__(self) -> Transformer:
        constrain = shd.LogicalConstraint(self.mesh, self.cfg.mesh.logical_rules)
        return Transformer(self.cfg.model, rngs=nnx.Rngs(self.cfg.run.seed), constrain=constrain,
                           quant_inputs=self.rounds_inputs, microbatches=self.cfg.pipeline.microbatches,
                           repeats=self.cfg.pipeline.repeats)


def model_fn(cfg: Config, mesh: jax.sharding.Mesh) -> TransformerFn:
    """The default Transformer's factory: the one place the LM job, generation, the benchmarks and
    the tests build it."""
    return TransformerFn(cfg, mesh)


def fit_kv_heads(cfg: Config, mesh: jax.sharding.Mesh) -> Config:
    """cfg, with the KV heads replicated (mesh.rules.kv_heads=[]) when the mesh axes of kv_heads do not divide
    model.kv_heads: each device then holds every KV head, as MaxText and vLLM do with fewer KV heads than
    tensor-parallel ways; the query heads stay split. Said once at start-up."""
    ways = shd.ways(mesh, cfg.mesh.logical_rules, "kv_heads")
    if cfg.model.kv_heads % ways == 0:
        return cfg
    log.info(f"model.n_kv_heads={cfg.model.kv_heads} does not split {ways} ways over "
             f"mesh.rules.kv_heads={list(cfg.mesh.rules['kv_heads'])}: every device holds all KV heads")
    rules = {**cfg.mesh.rules, "kv_heads": []}
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=rules))
