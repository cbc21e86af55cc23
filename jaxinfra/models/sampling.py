"""Sampling from a language model on whatever mesh its parameters live: the prompt's tokens (through the run's
tokenizer), and `sample`, the sliding-window reference the KV-cache decoder (decode.py) is checked against."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxinfra.core.errors import UserError
from jaxinfra.data.tokenizer import Tokenizer
from jaxinfra.parallel import sharding as shd


def prompt_ids(prompt: str, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """The prompt's token ids (tokenizer.encode); every id must be a token of the model's vocabulary."""
    if not prompt:
        raise UserError("prompt is empty: give at least one character")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError(f"prompt {prompt!r} encodes to no tokens with data.tokenizer={tokenizer.name}")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        what = f"byte {bad[0]}" if tokenizer.impl is None else f"token {bad[0]} (data.tokenizer={tokenizer.name})"
        raise UserError(f"prompt {prompt!r} holds {what}, outside the model's vocab_size={vocab_size}")
    return ids


def sample(graphdef: nnx.GraphDef, params: Any, prompts: Sequence[str], *,
           n_tokens: int, seq_len: int, tokenizer: Tokenizer, temperature: float, seed: int, mesh: Mesh,
           rules: shd.Rules) -> list[str]:
    """Continue each prompt by n_tokens tokens of `tokenizer` (sliding window of seq_len; 0 temperature = greedy);
    returns each prompt with its continuation, decoded."""
    forward = lambda p, window_BxT: nnx.merge(graphdef, p)(window_BxT)
    divisor = shd.batch_divisor(mesh, rules)
    B = -(-len(prompts) // divisor) * divisor  # pad the batch so it splits over the batch axes
    # the model's vocabulary is its logits' width (the tokenizer's ids, padded to split over the mesh)
    vocab_size = jax.eval_shape(forward, params, jax.ShapeDtypeStruct((B, seq_len), jnp.int32)).shape[-1]
    rows = [prompt_ids(p, tokenizer, vocab_size) for p in prompts]
    rows += [list(rows[0]) for _ in range(B - len(rows))]  # copies, not aliases
    win_sh = NamedSharding(mesh, shd.batch_spec(rules, 2))

    @jax.jit
    def next_token(p: Any, window_BxT: jax.Array, last_B: jax.Array, key: jax.Array) -> jax.Array:
        logits_BxTxV = forward(p, window_BxT)
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
    return [tokenizer.decode(r) for r in rows[:len(prompts)]]
