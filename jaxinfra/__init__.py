"""jaxinfra: sharded JAX training on a named (data, stage, fsdp, tensor) device mesh.

The public surface is `__all__` below: mesh utilities, logical sharding rules, the config, the
generic trainer, checkpoint and export helpers, magnitude pruning and int8 quantization. Names are imported lazily
on first use, so `import jaxinfra` (and loading a config) never starts JAX's backend: simulated
CPU devices (`use_cpu_devices`) and `init_distributed` can still be set up afterwards.
Everything else (submodules such as `jaxinfra.lm.job`) is internal.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS = {
    # mesh
    "make_mesh": ("parallel.mesh", "make_mesh"),
    "describe": ("parallel.mesh", "describe"),
    "use_cpu_devices": ("parallel.mesh", "use_cpu_devices"),
    "setup_devices": ("cli", "setup_devices"),
    "init_distributed": ("parallel.mesh", "init_distributed"),
    # logical axis rules -> shardings
    "logical_to_spec": ("parallel.sharding", "logical_to_spec"),
    "tree_shardings": ("parallel.sharding", "tree_shardings"),
    "LogicalConstraint": ("parallel.sharding", "LogicalConstraint"),
    "shard": ("parallel.sharding", "shard"),
    "gather": ("parallel.sharding", "gather"),
    # config
    "Config": ("settings.sections", "Config"),
    "load_config": ("settings.loading", "load_config"),
    "UserError": ("core.errors", "UserError"),
    # training
    "train_model": ("train.trainer", "train_model"),
    "Finished": ("train.options", "Finished"),
    "TrainOptions": ("train.options", "TrainOptions"),
    "TrainState": ("core.state", "TrainState"),
    "build_model": ("train.step", "build_model"),
    "Stacked": ("parallel.pipeline", "Stacked"),
    # checkpoints and exports
    "Checkpointer": ("ckpt.manager", "Checkpointer"),
    "export_checkpoint": ("export.writer", "export"),
    "load_safetensors": ("export.safetensors", "load"),
    "to_params": ("parallel.sharding", "to_params"),
    "read_params": ("ckpt.reader", "read_params"),
    # Hugging Face folders (llama, mistral, qwen2, qwen3)
    "from_pretrained": ("hub.pretrained", "from_pretrained"),
    # pruning
    "prune": ("compress.pruning", "prune"),
    "with_pruning": ("train.optim", "with_pruning"),
    "cubic_sparsity": ("compress.pruning", "cubic_sparsity"),
    "sparsity_of": ("compress.pruning", "sparsity_of"),
    # int8 quantization
    "QTensor": ("compress.quant", "QTensor"),
    "quantize_int8": ("compress.quant", "quantize"),
    "dequantize_int8": ("compress.quant", "dequantize"),
    "fake_quant": ("compress.quant", "fake_quant"),
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
