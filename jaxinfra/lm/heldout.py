"""Bits per byte over every held-out byte, the figure to set beside zlib and xz: sliding windows with
context, each byte scored exactly once (the periodic evaluations sample windows; this reads them all)."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxinfra.data import sources as data_lib
from jaxinfra.parallel import sharding as shd

TOKENS_PER_CALL = 65_536  # windows per compiled call: few calls, logits of about 64K x vocab floats


def windows(n: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, weight_WxL): windows of seq_len + 1 of n bytes, one every `stride` (and one ending at the
    last byte), and which of each window's seq_len targets it scores, so that bytes 1..n-1 are scored
    exactly once, each after at least seq_len - stride bytes of context (all of them in the first window)."""
    if not 1 <= stride <= seq_len or n < seq_len + 1:
        raise ValueError(f"{n} bytes, seq_len {seq_len}, stride {stride}: need 1 <= stride <= seq_len < n")
    last = n - seq_len - 1
    starts = np.arange(0, last + 1, stride, dtype=np.int64)
    if starts[-1] != last:
        starts = np.append(starts, last)
    weight_WxL = np.zeros((len(starts), seq_len), np.float32)
    covered = 0  # bytes 1..covered are scored
    for i, s in enumerate(starts):
        weight_WxL[i, max(covered, s) - s:] = 1  # target j of the window at s is byte s + 1 + j
        covered = s + seq_len
    return starts, weight_WxL


def bits_per_byte(graphdef: nnx.GraphDef, params: Any, tokens: np.ndarray, seq_len: int, mesh: Mesh,
                  rules: shd.Rules) -> float:
    """Mean bits per byte of `tokens` under the model (nnx.merge(graphdef, params)), windows of seq_len
    with seq_len // 2 bytes of context at least; the first byte, which nothing predicts, counts 8 bits."""
    starts, weight_WxL = windows(len(tokens), seq_len, max(1, seq_len // 2))
    divisor = shd.batch_divisor(mesh, rules)
    B = max(divisor, TOKENS_PER_CALL // seq_len // divisor * divisor)
    sharding = NamedSharding(mesh, shd.batch_spec(rules, 2))

    @jax.jit
    def bits(p: Any, tokens_BxL1: jax.Array, weight_BxL: jax.Array) -> jax.Array:
        logits_BxLxV = nnx.merge(graphdef, p)(tokens_BxL1[:, :-1])
        nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32), tokens_BxL1[:, 1:])
        return jnp.sum(nll_BxL * weight_BxL) / math.log(2)

    total = 8.0
    for first in range(0, len(starts), B):
        rows = starts[first:first + B]
        batch = {"tokens": np.zeros((B, seq_len + 1), np.int32), "weight": np.zeros((B, seq_len), np.float32)}
        batch["tokens"][:len(rows)] = tokens[rows[:, None] + np.arange(seq_len + 1)]
        batch["weight"][:len(rows)] = weight_WxL[first:first + B]  # padding rows weigh nothing
        placed = data_lib.from_host(batch, {"tokens": sharding, "weight": sharding})
        total += float(shd.gather(bits(params, placed["tokens"], placed["weight"])))
    return total / len(tokens)
