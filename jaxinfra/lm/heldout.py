"""Bits per byte over every held-out byte, the figure to set beside zlib and xz: sliding windows with
context, each token scored exactly once, the summed bits over the held-out text's bytes (the periodic
evaluations sample windows; this reads them all)."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxinfra.data import packing
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
                  rules: shd.Rules, *, n_bytes: int = 0, starts: np.ndarray | None = None) -> float:
    """Bits per byte of the held-out text under the model (nnx.merge(graphdef, params)): the summed negative
    log-likelihood of every token, each scored once in windows of seq_len with seq_len // 2 tokens of context
    at least, over n_bytes (default: one byte a token, the `bytes` tokenizer); the first token, which nothing
    predicts, costs log2(vocab) bits. With `starts` (data.packing=documents) context restarts at each document."""
    starts_W, weight_WxL = windows(len(tokens), seq_len, max(1, seq_len // 2))
    divisor = shd.batch_divisor(mesh, rules)
    B = max(divisor, TOKENS_PER_CALL // seq_len // divisor * divisor)
    sharding = NamedSharding(mesh, shd.batch_spec(rules, 2))
    keys = ("tokens",) + (packing.FIELDS if starts is not None else ())

    @jax.jit
    def bits(p: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        fields = [batch[k][:, :-1] for k in packing.FIELDS if k in batch]
        logits_BxLxV = nnx.merge(graphdef, p)(batch["tokens"][:, :-1], *fields)
        nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32),
                                                                  batch["tokens"][:, 1:])
        return jnp.sum(nll_BxL * batch["weight"]) / math.log(2), jnp.float32(logits_BxLxV.shape[-1])

    total = None
    for first in range(0, len(starts_W), B):
        rows = starts_W[first:first + B]
        batch = {k: np.zeros((B, seq_len + 1), np.int32) for k in keys}
        for i, s in enumerate(rows):
            for k, v in packing.window(tokens, starts, int(s), seq_len + 1).items():
                batch[k][i] = v
        batch["weight"] = np.zeros((B, seq_len), np.float32)
        batch["weight"][:len(rows)] = weight_WxL[first:first + B]  # padding rows weigh nothing
        placed = data_lib.from_host(batch, {k: sharding for k in batch})
        got, vocab = bits(params, placed)
        total = (math.log2(float(vocab)) if total is None else total) + float(shd.gather(got))
    return total / (n_bytes or len(tokens))
