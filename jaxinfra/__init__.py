"""jaxinfra: sharded JAX training on a named (data, stage, fsdp, tensor) device mesh.

The public surface is `__all__` below: mesh utilities, logical sharding rules, the config, the
generic trainer, checkpoint and export helpers, magnitude pruning and int8 quantization. Names are imported lazily
on first use, so `import jaxinfra` (and loading a config) never starts JAX's backend: simulated
CPU devices (`use_cpu_devices`) and `init_distributed` can still be set up afterwards.
Everything else (submodules such as `jaxinfra.job`) is internal.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS = {
    # mesh
    "make_mesh": ("mesh", "make_mesh"),
    "describe": ("mesh", "describe"),
    "use_cpu_devices": ("mesh", "use_cpu_devices"),
    "setup_devices": ("cli", "setup_devices"),
    "init_distributed": ("mesh", "init_distributed"),
    # logical axis rules -> shardings
    "logical_to_spec": ("sharding", "logical_to_spec"),
    "tree_shardings": ("sharding", "tree_shardings"),
    "LogicalConstraint": ("sharding", "LogicalConstraint"),
    "shard": ("sharding", "shard"),
    "gather": ("sharding", "gather"),
    # config
    "Config": ("config", "Config"),
    "load_config": ("config", "load_config"),
    "UserError": ("errors", "UserError"),
    # training
    "train_model": ("trainer", "train_model"),
    "Finished": ("trainer", "Finished"),
    "TrainState": ("step", "TrainState"),
    "build_model": ("step", "build_model"),
    "Stacked": ("pipeline", "Stacked"),
    # checkpoints and exports
    "Checkpointer": ("checkpoint", "Checkpointer"),
    "export_checkpoint": ("export", "export"),
    "load_safetensors": ("export", "load"),
    "to_params": ("export", "to_params"),
    "read_params": ("checkpoint", "read_params"),
    # pruning
    "prune": ("pruning", "prune"),
    "with_pruning": ("optim", "with_pruning"),
    "cubic_sparsity": ("pruning", "cubic_sparsity"),
    "sparsity_of": ("pruning", "sparsity_of"),
    # int8 quantization
    "QTensor": ("quant", "QTensor"),
    "quantize_int8": ("quant", "quantize"),
    "dequantize_int8": ("quant", "dequantize"),
    "fake_quant": ("quant", "fake_quant"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxinfra' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f"jaxinfra.{module}"), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """Public names first-class in dir() and tab completion."""
    return sorted(set(globals()) | set(__all__))
