"""jaxinfra: sharded JAX training on a named (data, fsdp, tensor) device mesh.

Modules: config, mesh, sharding, model, optim, data, train, checkpoint, export, metrics, generate,
job (the default job) and cli (its command line). `jaxinfra.mesh` imports nothing else of ours.
"""

__version__ = "0.1.0"
