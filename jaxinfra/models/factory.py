"""The default Transformer's factory: cfg.model on a mesh, its activations pinned by the logical rules."""
from __future__ import annotations

from dataclasses import dataclass

import jax
from flax import nnx

from jaxinfra.models.transformer import Transformer
from jaxinfra.parallel import sharding as shd
from jaxinfra.settings.sections import Config


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
