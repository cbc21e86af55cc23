"""int8 quantization: the one function that turns a float tensor into int8 values and scales (Qwix's
numerics), the straight-through rounding a QAT forward pass applies to weights (and, in the default
Transformer, to matmul inputs). The QAT wiring lives in train/compression.py, the int8 export layout
(compressed-tensors', what vLLM loads) in export/int8.py.

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

import functools
from typing import TYPE_CHECKING, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix

if TYPE_CHECKING:
    from jaxinfra.compress.roles import Role


class QTensor(NamedTuple):
    """A quantized kernel: int8 values and float scales of the same rank (1 on the input-feature dims)."""

    values: jax.Array
    scale: jax.Array


def quantize(w: jax.Array | np.ndarray, in_dims: Sequence[int]) -> QTensor:
    """Symmetric int8 with one scale per channel (every dim but `in_dims`): Qwix's numerics."""
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


