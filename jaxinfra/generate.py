"""Sampling bytes from a trained language model, on whatever mesh its parameters live."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxinfra import storage
from jaxinfra import sharding as shd
from jaxinfra.errors import UserError


def encode(prompt: str, vocab_size: int) -> list[int]:
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
    rows = [encode(p, vocab_size) for p in prompts]
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



def generate_from_run(run_dir: str, prompts: Sequence[str], *, n_tokens: int = 200, temperature: float = 0.8,
                      seed: int = 0, step: int | None = None) -> tuple[list[str], int]:
    """Load a run's newest (or given) checkpoint onto all local devices (data parallel) and sample.

    Returns (texts, step). The model is rebuilt from the run's config.yaml.
    """
    import os

    from jaxinfra import checkpoint, export
    from jaxinfra.config import load_config
    from jaxinfra.job import model_fn
    from jaxinfra.mesh import make_mesh
    from jaxinfra.step import abstract_model

    path = storage.join(run_dir, "config.yaml")
    storage.check(run_dir, "run folder")
    storage.reachable(run_dir, "run folder")
    if not storage.isfile(path):
        raise UserError(f"{run_dir}: no config.yaml (is it a run folder?)")
    if storage.is_remote(path):
        import tempfile
        with tempfile.TemporaryDirectory(prefix="jaxinfra-read-") as tmp:
            storage.download(path, os.path.join(tmp, "config.yaml"))
            cfg = load_config(os.path.join(tmp, "config.yaml"))
    else:
        cfg = load_config(path)
    for p in prompts:
        encode(p, cfg.model.vocab_size)
    flat, step = checkpoint.read_params(run_dir, step)
    mesh = make_mesh(-1, 1, 1)
    rules = cfg.mesh.logical_rules
    with jax.set_mesh(mesh):
        model = abstract_model(model_fn(cfg, mesh))
        params = export.to_params(flat, model.params, shd.tree_shardings(model.logical, mesh, rules))
        texts = sample(model.eval_def, params, prompts, n_tokens=n_tokens, seq_len=cfg.model.seq_len,
                       vocab_size=cfg.model.vocab_size, temperature=temperature, seed=seed, mesh=mesh, rules=rules)
    return texts, step
