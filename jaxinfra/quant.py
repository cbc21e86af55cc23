"""int8 quantization: the one function that turns a float tensor into int8 values and scales (Qwix's
numerics), the straight-through rounding a QAT forward pass applies to weights (and, in the default
Transformer, to matmul inputs), and the int8 export layout (compressed-tensors', what vLLM loads).

A kernel's *input-feature* dims (those a matmul contracts with the input) share one scale; every
other dim is a channel with its own: a Linear (in, out) gets scales (1, out), our attention
kernels (D, H, K) scales (1, H, K) and (H, K, D) scales (1, 1, D). Scales keep the kernel's rank, so
`values * scale` broadcasts back. The integers are Qwix's (`qwix.quantize`): scale = absmax / 127.5,
values = round(w / scale) saturated to int8. Training rounds each weight with that same function,
so a QAT run's export holds exactly the integers its forward pass used.

Why not Qwix's own QAT (`qwix.quantize_model` with a `QtProvider`): on an FSDP mesh it rounds each
weight's shard for the forward pass and rebuilds a copy for the backward pass, so XLA all-gathers
every attention weight twice (26 all-gathers against the dense step's 18 on a (2, 2, 2) mesh,
measured; its use_original_residuals and gradient-clipping options do not change it), and pinning the
gather first is not possible: Qwix finds a matmul's weight by object identity, tracer ancestry or
shape, which a sharding constraint hides under autodiff ("Multiple candidate params found: wk, wq, wv").
Rounding the sharded parameters in the step, as below, gathers each weight once, like the dense step.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra.errors import UserError
from jaxinfra.names import path_str
from jaxinfra.pipeline import layer_names, lead_of

if TYPE_CHECKING:
    from jaxinfra.config import QuantConfig
    from jaxinfra.roles import Role
    from jaxinfra.step import ModelDef


class QTensor(NamedTuple):
    """A quantized kernel: int8 values and float scales of the same rank (1 on the input-feature dims)."""

    values: jax.Array
    scale: jax.Array


def quantize(w: jax.Array | np.ndarray, in_dims: Sequence[int]) -> QTensor:
    """Symmetric int8 with one scale per channel (every dim but `in_dims`): Qwix's numerics."""
    import qwix
    w = jnp.asarray(w)
    channels = tuple(d for d in range(w.ndim) if d not in {d % w.ndim for d in in_dims})
    q = qwix.quantize(w, jnp.int8, channelwise_axes=channels, calibration_method="absmax")
    return QTensor(q.qvalue, q.scale)


def dequantize(q: QTensor, dtype: jnp.dtype | None = None) -> jax.Array:
    """values x scale, in the scale's dtype (or `dtype`)."""
    dtype = dtype or q.scale.dtype
    return q.values.astype(dtype) * q.scale.astype(dtype)


def kernel_dims(found: Mapping[str, Role], names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name ('blocks.0.attn.wq') -> the dims its matmul contracts, for the given paths."""
    return {name.replace("/", "."): found[name].in_dims or (found[name].in_dim or 0,) for name in names}


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fake_quant(x: jax.Array, in_dims: tuple[int, ...]) -> jax.Array:
    """x as int8 gives it back (one scale per channel, every dim but in_dims): exactly
    dequantize(quantize(x)) in the forward pass, the identity in the backward pass (straight-through:
    rounding's derivative taken as 1)."""
    return dequantize(quantize(x, in_dims), x.dtype)


@fake_quant.defjvp
def _straight_through(in_dims: tuple[int, ...], primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    return fake_quant(x, in_dims), t


@dataclass(frozen=True, eq=False)
class RoundedWeights:
    """params -> the params a QAT forward pass computes with: each chosen kernel, cast to the compute
    dtype as the model casts it, rounded to int8 per output channel (straight-through). Applied to
    the sharded parameters inside the step, so each device rounds its own shard (the scales' max is
    a small all-reduce) and the model gathers the rounded weight once for both passes."""

    in_dims: tuple[tuple[str, tuple[int, ...]], ...]  # (path 'blocks/0/attn/wq', its contracted dims)
    dtype: str  # the compute dtype

    def __call__(self, params: Any) -> Any:
        dims = dict(self.in_dims)

        def one(path: tuple, w: jax.Array) -> jax.Array:
            d = dims.get(path_str(path))
            return w if d is None else fake_quant(w.astype(self.dtype), d).astype(w.dtype)
        return jax.tree_util.tree_map_with_path(one, params)


def for_config(q: QuantConfig, model: ModelDef, found: Mapping[str, Role], compute_dtype: str,
               say: Callable[..., None]) -> tuple[ModelDef, dict[str, tuple[int, ...]]]:
    """The model whose forward pass rounds what quant.* chooses (its parameters stay float), and the
    quantized tensors with the dims they contract."""
    from jaxinfra import roles
    # the output layer too (unlike pruning's default): int8 costs it little, and it is a tenth of a
    # small model's bytes (quant.exclude=[head] keeps it float)
    selection = roles.select(model.params, model.logical, found, q.params, q.exclude, key="quant",
                             output_layer_too=True, stacked=model.stacked)
    for name in selection.chosen:
        if found[name].kind != "kernel":
            raise UserError(f"quant.params selects {name}, which no matmul uses as a weight: int8 weights are "
                            f"matmul and conv weights")
    kernels = kernel_dims(found, selection.chosen)
    what = "int8 weights" + (" and matmul inputs" if q.activations == "int8" else "")
    layers = dict.fromkeys("/".join("*" if part.isdigit() else part for part in p.split("/")) for p in selection.chosen)
    say(f"quantization-aware training ({what}, one scale per output channel): {len(kernels)} tensors "
        f"({', '.join(layers)})")
    rounded = RoundedWeights(tuple((p, kernels[p.replace("/", ".")]) for p in selection.chosen), compute_dtype)
    return dataclasses.replace(model, forward=rounded), kernels


def kernels_record(found: Mapping[str, Role], compute_dtype: str) -> dict[str, Any]:
    """What a checkpoint records for int8 exports: every matmul weight and the dims it contracts, the
    dtype the forward pass casts weights to (QAT rounds the cast weight), and (QAT runs) the tensors
    it quantized."""
    return {"in_dims": kernel_dims(found, [n for n, r in found.items() if r.kind == "kernel"]),
            "compute_dtype": compute_dtype}


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
    from jaxinfra import checkpoint as ckpt_lib
    record = ckpt_lib.saved_record(step_dir)
    kernels = record.get("kernels")
    if not isinstance(kernels, dict) or not isinstance(kernels.get("in_dims"), dict):
        raise UserError(f"{step_dir}: its record does not say which tensors are matmul weights (saved by an older "
                        f"jaxinfra, or not by train_model): --quant int8 needs it; resume the run once to re-save")
    chosen = kernels.get("quantized") or kernels["in_dims"]
    stacked = ckpt_lib.saved_stacked(step_dir)
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
