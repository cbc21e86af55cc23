"""Text from a trained run: its newest (or given) checkpoint loaded onto the local devices and each prompt continued
with the KV-cache decoder (jaxinfra.models.decode)."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Sequence

import jax

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.compress import quant
from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import layer_names, tensor_name
from jaxinfra.export import int8
from jaxinfra.models import decode
from jaxinfra.models.factory import model_fn
from jaxinfra.models.sampling import prompt_bytes
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.loading import load_config
from jaxinfra.train.step import abstract_model


def generate_from_run(run_dir: str, prompts: Sequence[str], *, n_tokens: int = 200, temperature: float = 0.8,
                      seed: int = 0, step: int | None = None) -> tuple[list[str], int, dict[str, Any]]:
    """Load a run's newest (or given) checkpoint onto all local devices (data parallel) and continue each
    prompt with the KV-cache decoder (jaxinfra.models.decode; `sample` is the sliding-window reference).

    Returns (texts, step, info): info as decode.generate's (cache_bytes, tokens_per_s, compile_s, ...).
    The model is rebuilt from the run's config.yaml; a QAT run decodes as it trained: its int8 kernels
    as int8 values and scales (quant.quantize of the saved float weights) and, for quant.activations=int8,
    matmul inputs rounded per token.
    """
    path = storage.join(run_dir, "config.yaml")
    storage.check(run_dir, "run folder")
    storage.reachable(run_dir, "run folder")
    if not storage.isfile(path):
        raise UserError(f"{run_dir}: no config.yaml (is it a run folder?)")
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="jaxinfra-read-") as tmp:
            storage.download(path, os.path.join(tmp, "config.yaml"))
            cfg = load_config(os.path.join(tmp, "config.yaml"))
    else:
        cfg = load_config(path)
    for p in prompts:
        prompt_bytes(p, cfg.model.vocab_size)
    flat, step = ckpt_reader.read_params(run_dir, step)
    mesh = make_mesh(-1, 1, 1)
    # the decoder walks the layers in order: a circular run's (repeats, layers) stack reads back as one
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, repeats=1))
    rules = cfg.mesh.logical_rules
    with jax.set_mesh(mesh):
        model = abstract_model(model_fn(cfg, mesh))
        params = shd.to_params(flat, model.params, shd.tree_shardings(model.logical, mesh, rules),
                                   stacked=model.stacked)
        if cfg.quant.enabled:
            params = _as_trained(params, ckpt_reader.locate(run_dir, step)[0], model.stacked)
        new, info = decode.generate(params, cfg.model, prompts, n_tokens=n_tokens, temperature=temperature,
                                    seed=seed, mesh=mesh, rules=rules, quant_inputs=cfg.quant.activations == "int8")
    texts = [bytes(prompt_bytes(p, cfg.model.vocab_size) + t).decode("utf-8", errors="replace")
             for p, t in zip(prompts, new)]
    return texts, step, info


def _as_trained(params: Any, step_dir: str, stacked: Any) -> Any:
    """A QAT run's parameters with the kernels it rounded as int8 QTensors (what its forward pass used)."""
    plan, compute_dtype = int8.export_plan(step_dir)  # by whole layer: a stacked tensor's dims shift by one

    def one(path: tuple, w: jax.Array) -> Any:
        layers = layer_names(tensor_name(path), w.shape, stacked, ".")
        dims = plan.get(layers[0] if layers else tensor_name(path))
        lead = 1 if layers else 0
        return w if dims is None else quant.quantize(w.astype(compute_dtype), tuple(d + lead for d in dims))
    return jax.tree_util.tree_map_with_path(one, params)
