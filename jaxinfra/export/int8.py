"""The int8 export layout, compressed-tensors' (what vLLM loads): which tensors a step's record says to quantize,
the stored entries, a reader that quantizes each tensor once, and the way back to float."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.compress.quant import QTensor, quantize
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import layer_names, lead_of

# The int8 export layout, compressed-tensors' (what vLLM loads): a quantized tensor keeps its name
# and holds int8 values; its scales sit beside it under the name + "_scale" (HF's q_proj.weight ->
# q_proj.weight_scale), shaped like the tensor with 1 on the contracted dims.
SCALE = "_scale"


QUANTIZED = "quantized"  # __metadata__ key: JSON {name: the dtype it dequantizes to}


Entry = tuple[str, tuple[int, ...], np.dtype]


def export_plan(step_dir: str) -> tuple[dict[str, tuple[int, ...]], str]:
    """(name -> contracted dims of each tensor to quantize, the forward pass's compute dtype) from a
    checkpoint step's record: a QAT run's own tensors, else every matmul
    weight (output layer included, as QAT's default; embeddings are looked up, not multiplied)."""
    record = ckpt_reader.saved_record(step_dir)
    kernels = record.get("kernels")
    if not isinstance(kernels, dict) or not isinstance(kernels.get("in_dims"), dict):
        raise UserError(f"{step_dir}: its record does not say which tensors are matmul weights (saved by an older "
                        f"jaxinfra, or not by train_model): --quant int8 needs it; resume the run once to re-save")
    chosen = kernels.get("quantized") or kernels["in_dims"]
    stacked = ckpt_reader.saved_stacked(step_dir)
    plan = {}
    for name, dims in chosen.items():  # a stacked tensor's dims, shifted to those of its whole layers
        lead = lead_of(name, None, stacked, ".")
        for layer in layer_names(name, None, stacked, ".") or [name]:
            plan[layer] = tuple(int(d) - lead if int(d) >= 0 else int(d) for d in dims)
    return plan, str(kernels.get("compute_dtype", "float32"))


def quantized_entries(entries: Sequence[Entry], plan: Mapping[str, tuple[int, ...]], compute_dtype: str
                      ) -> list[Entry]:
    """The stored tensors of an int8 export: each planned tensor becomes int8 values plus its scales."""
    out: list[Entry] = []
    for name, shape, dt in entries:
        if name not in plan:
            out.append((name, shape, dt))
            continue
        dims = {d % len(shape) for d in plan[name]}
        out += [(name, shape, np.dtype(np.int8)),
                (name + SCALE, tuple(1 if d in dims else n for d, n in enumerate(shape)), _np_dtype(compute_dtype))]
    return out


def _np_dtype(name: str) -> np.dtype:
    """A dtype name (bfloat16 included) as numpy's."""
    return np.dtype(jnp.dtype(name))


class QuantizedReader:
    """read(name, dtype) of the stored tensors of an int8 export: a planned tensor is cast to the
    compute dtype (as the forward pass casts it before Qwix rounds it) and quantized once; its
    values and then its scales are handed out, in the order the entries list them."""

    def __init__(self, read: Callable[[str, np.dtype], np.ndarray], plan: Mapping[str, tuple[int, ...]],
                 compute_dtype: str):
        self.read, self.plan, self.dtype = read, plan, _np_dtype(compute_dtype)
        self._held: tuple[str, QTensor] | None = None  # one tensor's scales, until they are written

    def __call__(self, name: str, dt: np.dtype) -> np.ndarray:
        if name in self.plan:
            w = self.read(name, self.dtype)
            with jax.default_device(jax.local_devices(backend="cpu")[0]):  # host arrays: no accelerator copy
                q = quantize(w, self.plan[name])
            self._held = (name, QTensor(np.asarray(q.values), np.asarray(q.scale)))
            return self._held[1].values
        if name.endswith(SCALE) and self._held and self._held[0] == name[:-len(SCALE)]:
            scale, self._held = self._held[1].scale, None
            return scale
        return self.read(name, dt)


def dequantize_tensors(tensors: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> dict[str, np.ndarray]:
    """name -> array of a file's tensors with each quantized one (int8 values + name_scale) turned back
    into float (values x scale in the scale's dtype, then the recorded dtype); raises ValueError
    naming what does not fit."""
    out = dict(tensors)
    for name, dtype in dtypes.items():
        values, scale = out.pop(name, None), out.pop(name + SCALE, None)
        if values is None or scale is None or values.dtype != np.int8:
            raise ValueError(f"quantized tensor {name} needs int8 values and {name}{SCALE}")
        if scale.ndim != values.ndim or any(s not in (1, n) for s, n in zip(scale.shape, values.shape)):
            raise ValueError(f"{name}{SCALE} has shape {scale.shape}, which does not broadcast to {values.shape}")
        out[name] = (values.astype(scale.dtype) * scale).astype(_np_dtype(dtype))
    return out


def compressed_tensors_config(ignored: Iterable[str], activations: str) -> dict[str, Any]:
    """config.json's quantization_config for int8 channel-wise weights (and dynamic per-token int8
    activations after QAT of both) in compressed-tensors' int-quantized format; module names (HF's,
    without '.weight') of Linear layers left in float go in `ignore`."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
               "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"}
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
            "group_size": None, "block_structure": None, "actorder": None, "observer": None} \
        if activations == "int8" else None
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None}},
            "ignore": sorted(ignored), "kv_cache_scheme": None}
