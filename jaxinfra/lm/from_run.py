"""Text from a trained run: its newest (or given) checkpoint, or a safetensors export of it, loaded onto the local
devices and each prompt continued with the KV-cache decoder (jaxinfra.models.decode), through the run's tokenizer."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Sequence

import jax
from flax import nnx

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.compress import quant
from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import layer_names, tensor_name
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.export import int8
from jaxinfra.export import safetensors as safetensors_lib
from jaxinfra.export import writer as export_lib
from jaxinfra.models import decode
from jaxinfra.hub import families, pretrained
from jaxinfra.models.factory import fit_kv_heads, model_fn
from jaxinfra.models.sampling import prompt_ids
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.loading import load_config
from jaxinfra.settings.sections import Config
from jaxinfra.train.step import abstract_model


def generate_from_run(run_dir: str, prompts: Sequence[str], *, n_tokens: int = 200, temperature: float = 0.8,
                      seed: int = 0, step: int | None = None) -> tuple[list[str], int, dict[str, Any]]:
    """Load a run's newest (or given) checkpoint onto all local devices (data parallel) and continue each
    prompt with the KV-cache decoder (jaxinfra.models.decode; `sample` is the sliding-window reference).

    run_dir may also name a safetensors export of the run (exports/model-<step>.safetensors, or its shards'
    index); a run folder with exports but no checkpoint left decodes its newest export. Prompts are encoded and
    the texts decoded with the run's tokenizer (the export's own, when it carries one).

    Returns (texts, step, info): info as decode.generate's (cache_bytes, tokens_per_s, compile_s, ...).
    The model is rebuilt from the run's config.yaml; a QAT run decodes as it trained: its int8 kernels
    as int8 values and scales (quant.quantize of the saved float weights) and, for quant.activations=int8,
    matmul inputs rounded per token.
    """
    if families.is_hf_folder(run_dir):
        if step is not None:
            raise UserError(f"--step {step}: {run_dir} is a Hugging Face folder, not a run folder with steps")
        return generate_from_folder(run_dir, prompts, n_tokens=n_tokens, temperature=temperature, seed=seed)
    export = run_dir if run_dir.endswith((".safetensors", ".safetensors.index.json")) else None
    if export is not None:
        run_dir = storage.dirname(export)
        run_dir = storage.dirname(run_dir) if storage.basename(run_dir) == export_lib.EXPORTS else run_dir
    cfg = _run_config(run_dir)
    if export is None and not ckpt_reader.has_steps(run_dir) and export_lib.newest_export(run_dir) is not None:
        export = export_lib.newest_export(run_dir)[0]  # the checkpoints are gone, the export is what is left
    if export is not None:
        if cfg.quant.enabled:
            raise UserError(f"{export}: a QAT run decodes from its checkpoints (they hold its int8 plan), not an "
                            f"export")
        tokenizer = export_lib.export_tokenizer(export) or tok_lib.run_tokenizer(
            run_dir, {"data": {"tokenizer": cfg.data.tokenizer}})
        found = export_lib.export_metadata(export).get("step", "")
        if step is not None and str(step) != found:
            raise UserError(f"--step {step} does not match the export {export} (step {found or 'unknown'})")
        step_dir, step = None, int(found) if found.isdigit() else 0
    else:
        step_dir, step = ckpt_reader.locate(run_dir, step)
        tokenizer = tok_lib.run_tokenizer(step_dir, ckpt_reader.saved_config(step_dir))
    rows = [prompt_ids(p, tokenizer, cfg.model.vocab_size) for p in prompts]  # before anything is read
    flat = safetensors_lib.load(export) if export is not None else ckpt_reader.read_params(step_dir)[0]
    mesh = make_mesh(-1, 1, 1)
    # the decoder walks the layers in order: a circular run's (repeats, layers) stack reads back as one
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, repeats=1))
    rules = cfg.mesh.logical_rules
    with jax.set_mesh(mesh):
        model = abstract_model(model_fn(cfg, mesh))
        params = shd.to_params(flat, model.params, shd.tree_shardings(model.logical, mesh, rules),
                                   stacked=model.stacked)
        if cfg.quant.enabled:
            params = _as_trained(params, step_dir, model.stacked)
        new, info = decode.generate(params, cfg.model, rows, n_tokens=n_tokens, temperature=temperature,
                                    seed=seed, mesh=mesh, rules=rules, quant_inputs=cfg.quant.activations == "int8")
    return [tokenizer.decode(r + t) for r, t in zip(rows, new)], step, info


def generate_from_folder(path: str, prompts: Sequence[str], *, n_tokens: int, temperature: float, seed: int
                         ) -> tuple[list[str], int, dict[str, Any]]:
    """generate_from_run for a Hugging Face folder (hub/pretrained.py): its model on all local devices (data
    parallel), its tokenizer.json; the KV cache holds the prompts and new tokens (at most max_position_embeddings,
    the longest prompts keep their last tokens). Returns (texts, 0, info)."""
    tokenizer = tok_lib.load(path)
    cfg = pretrained.folder_config(path)  # model.seq_len: the folder's max_position_embeddings
    rows = [prompt_ids(p, tokenizer, cfg.model.vocab_size) for p in prompts]
    seq_len = min(cfg.model.seq_len, max(map(len, rows)) + n_tokens)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seq_len=seq_len))
    mesh = make_mesh(-1, 1, 1)
    cfg = fit_kv_heads(cfg, mesh)
    with jax.set_mesh(mesh):
        model, _ = pretrained.from_pretrained(path, mesh=mesh)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        new, info = decode.generate(params, cfg.model, rows, n_tokens=n_tokens, temperature=temperature, seed=seed,
                                    mesh=mesh, rules=cfg.mesh.logical_rules, quant_inputs=_w8a8(path))
    return [tokenizer.decode(r + t) for r, t in zip(rows, new)], 0, info


def _w8a8(path: str) -> bool:
    """Whether a folder's int8 export asks for int8 matmul inputs too (our W8A8 QAT export: dynamic per token)."""
    quant = families.read_config(path).get("quantization_config") or {}
    return any(group.get("input_activations") for group in (quant.get("config_groups") or {}).values())


def _run_config(run_dir: str) -> Config:
    """The config a run folder was trained with (its config.yaml)."""
    path = storage.join(run_dir, "config.yaml")
    storage.check(run_dir, "run folder")
    storage.reachable(run_dir, "run folder")
    if not storage.isfile(path):
        raise UserError(f"{run_dir}: no config.yaml (is it a run folder?)")
    if not storage.is_remote(path):
        return load_config(path)
    with tempfile.TemporaryDirectory(prefix="jaxinfra-read-") as tmp:
        storage.download(path, os.path.join(tmp, "config.yaml"))
        return load_config(os.path.join(tmp, "config.yaml"))


def _as_trained(params: Any, step_dir: str, stacked: Any) -> Any:
    """A QAT run's parameters with the kernels it rounded as int8 QTensors (what its forward pass used)."""
    plan, compute_dtype = int8.export_plan(step_dir)  # by whole layer: a stacked tensor's dims shift by one

    def one(path: tuple, w: jax.Array) -> Any:
        layers = layer_names(tensor_name(path), w.shape, stacked, ".")
        dims = plan.get(layers[0] if layers else tensor_name(path))
        lead = 1 if layers else 0
        return w if dims is None else quant.quantize(w.astype(compute_dtype), tuple(d + lead for d in dims))
    return jax.tree_util.tree_map_with_path(one, params)
