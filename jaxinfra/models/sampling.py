"""Sampling from a language model on whatever mesh its parameters live: the prompt's tokens, and `sample`, the
sliding-window reference the KV-cache decoder (decode.py) is checked against."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxinfra.core.errors import UserError
from jaxinfra.parallel import sharding as shd


def prompt_bytes(prompt: str, vocab_size: int) -> list[int]:
    """UTF-8 bytes of the prompt; every byte must be a token of the model's vocabulary."""
    data = list(prompt.encode("utf-8"))
    bad = [b for b in data if b >= vocab_size]
    if bad:
        raise UserError(f"prompt {prompt!r} holds byte {bad[0]}, outside the model's vocab_size={vocab_size}")
    if not data:
        raise UserError("prompt is empty: give at least one character")
    return data


def sample(graphdef: nnx.GraphDef, params: Any, prompts: Sequence[str], *,
           n_tokens: int, seq_len: int, vocab_size: int, temperature: float, seed: int, mesh: Mesh,
           rules: shd.Rules) -> list[str]:
    """Continue each prompt by n_tokens bytes (sliding window of seq_len; 0 temperature = greedy)."""
    rows = [prompt_bytes(p, vocab_size) for p in prompts]
    divisor = shd.batch_divisor(mesh, rules)
    B = -(-len(rows) // divisor) * divisor  # pad the batch so it splits over the batch axes
    rows += [list(rows[0]) for _ in range(B - len(rows))]  # copies, not aliases
    win_sh = NamedSharding(mesh, shd.batch_spec(rules, 2))

    @jax.jit
    def next_token(p: Any, window_BxT: jax.Array, last_B: jax.Array, key: jax.Array) -> jax.Array:
        logits_BxTxV = nnx.merge(graphdef, p)(window_BxT)
        logits_BxV = jnp.take_along_axis(logits_BxTxV, last_B[:, None, None], axis=1)[:, 0]
        if temperature == 0:
            return jnp.argmax(logits_BxV, axis=-1)
        return jax.random.categorical(key, logits_BxV / temperature, axis=-1)

    key = jax.random.key(seed)
    for _ in range(n_tokens):
        window = np.zeros((B, seq_len), np.int32)
        last = np.zeros((B,), np.int32)
        for i, r in enumerate(rows):
            tail = r[-seq_len:]
            window[i, :len(tail)] = tail
            last[i] = len(tail) - 1
        key, sub = jax.random.split(key)
        # every process holds the same rows: each device takes its slice of the host copy
        window_g = jax.make_array_from_callback((B, seq_len), win_sh, lambda idx: window[idx])
        tokens = shd.gather(next_token(params, window_g, last, sub))
        for i in range(B):
            rows[i].append(int(tokens[i]))
    return [bytes(r).decode("utf-8", errors="replace") for r in rows[:len(prompts)]]
