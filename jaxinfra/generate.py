"""Sampling bytes from a trained language model, on whatever mesh its parameters live: `sample` recomputes a
sliding window of seq_len per token (the reference); `generate_from_run` decodes with jaxinfra.decode's KV cache."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxinfra import storage
from jaxinfra import sharding as shd
from jaxinfra.errors import UserError
from jaxinfra.names import tensor_name
from jaxinfra.pipeline import layer_names


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
                      seed: int = 0, step: int | None = None) -> tuple[list[str], int, dict[str, Any]]:
    """Load a run's newest (or given) checkpoint onto all local devices (data parallel) and continue each
    prompt with the KV-cache decoder (jaxinfra.decode; `sample` is the sliding-window reference).

    Returns (texts, step, info): info as decode.generate's (cache_bytes, tokens_per_s, compile_s, ...).
    The model is rebuilt from the run's config.yaml; a QAT run decodes as it trained: its int8 kernels
    as int8 values and scales (quant.quantize of the saved float weights) and, for quant.activations=int8,
    matmul inputs rounded per token.
    """
    import os

    from jaxinfra import checkpoint, decode, export
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
    # the decoder walks the layers in order: a circular run's (repeats, layers) stack reads back as one
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, repeats=1))
    rules = cfg.mesh.logical_rules
    with jax.set_mesh(mesh):
        model = abstract_model(model_fn(cfg, mesh))
        params = export.to_params(flat, model.params, shd.tree_shardings(model.logical, mesh, rules),
                                   stacked=model.stacked)
        if cfg.quant.enabled:
            params = _as_trained(params, checkpoint.locate(run_dir, step)[0], model.stacked)
        new, info = decode.generate(params, cfg.model, prompts, n_tokens=n_tokens, temperature=temperature,
                                    seed=seed, mesh=mesh, rules=rules, quant_inputs=cfg.quant.activations == "int8")
    texts = [bytes(encode(p, cfg.model.vocab_size) + t).decode("utf-8", errors="replace") for p, t in zip(prompts, new)]
    return texts, step, info


def _as_trained(params: Any, step_dir: str, stacked: Any) -> Any:
    """A QAT run's parameters with the kernels it rounded as int8 QTensors (what its forward pass used)."""
    from jaxinfra import quant
    plan, compute_dtype = quant.export_plan(step_dir)  # by whole layer: a stacked tensor's dims shift by one

    def one(path: tuple, w: jax.Array) -> Any:
        layers = layer_names(tensor_name(path), w.shape, stacked, ".")
        dims = plan.get(layers[0] if layers else tensor_name(path))
        lead = 1 if layers else 0
        return w if dims is None else quant.quantize(w.astype(compute_dtype), tuple(d + lead for d in dims))
    return jax.tree_util.tree_map_with_path(one, params)
