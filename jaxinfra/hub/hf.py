"""The Hugging Face tensor layout of the default Transformer (Llama's, which Mistral, Qwen2 and Qwen3 share,
with Qwen2's q/k/v biases and Qwen3's q/k norms): export a checkpoint step as a folder transformers loads
(config.json of the run's family, model.safetensors or its shards and index, generation_config.json, the
tokenizer), and read such a folder back (`checkpoint.init_from`, hub/pretrained.py).

Rotary positions are the rotate-half form with inverse frequencies theta^(-2i/head_dim) (HF's `rotate_half` and
`inv_freq` exactly, so q and k need no permutation). Only layouts change: our kernels are (in, out) for
`x @ w`, HF's Linear weights (out, in); attention kernels (D, H, K) and (H, K, D) flatten their heads, biases
(H, K) too. Each tensor is transformed as it is streamed: host memory stays about one tensor. A run that
started from a folder keeps that folder's config fields and tokenizer files (lm/pretrained.py copies them
into the run's `source/`), and its export writes them back.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Any, Callable

import jax
import numpy as np

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import tensor_name, whole_layers
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.export import int8
from jaxinfra.export import safetensors as safetensors_lib
from jaxinfra.export import writer as export_lib
from jaxinfra.hub import families

CONFIG, WEIGHTS, INDEX = families.CONFIG, "model.safetensors", "model.safetensors.index.json"

# ours -> (HF name, (to HF layout, back from HF layout given our shape, read our slice from HF's)). {i} is the layer.
# A slice reader gets `hf(index)` (a slice of the HF tensor, read from the file) and our slices `ix`.


def _heads(ix: tuple[slice, ...], shape: tuple[int, ...]) -> slice:
    """The rows of a flattened (H*K) dimension that heads ix[0] of (H, K, ...) span."""
    return slice(ix[0].start * shape[1], ix[0].stop * shape[1])


_T = (lambda w: w.T, lambda w, shape: w.T.reshape(shape),  # (in, out) kernel <-> (out, in) Linear weight
      lambda hf, ix, shape: hf((ix[1], ix[0])).T)
_SAME = (lambda w: w, lambda w, shape: w.reshape(shape), lambda hf, ix, shape: hf(ix))
_FLAT = (lambda w: w.reshape(-1), lambda w, shape: w.reshape(shape),  # a bias (H, K) <-> (H*K,)
         lambda hf, ix, shape: hf((_heads(ix, shape),)).reshape(-1, shape[1])[:, ix[1]])
_IN_HEADS = (lambda w: w.reshape(w.shape[0], -1).T, lambda w, shape: w.T.reshape(shape),  # (D, H, K) <-> (H*K, D)
             lambda hf, ix, shape: hf((_heads(ix[1:], shape[1:]), ix[0])).T.reshape(
                 ix[0].stop - ix[0].start, -1, shape[2])[:, :, ix[2]])
_OUT_HEADS = (lambda w: w.reshape(-1, w.shape[-1]).T, lambda w, shape: w.T.reshape(shape),  # (H, K, D) <-> (D, H*K)
              lambda hf, ix, shape: hf((ix[2], _heads(ix, shape))).T.reshape(
                  -1, shape[1], ix[2].stop - ix[2].start)[:, ix[1], :])
LAYOUT: dict[str, tuple[str, tuple[Callable, Callable, Callable]]] = {
    "embed": ("model.embed_tokens.weight", _SAME),
    "final_norm.scale": ("model.norm.weight", _SAME),
    "head": ("lm_head.weight", _T),
    "blocks.{i}.attn_norm.scale": ("model.layers.{i}.input_layernorm.weight", _SAME),
    "blocks.{i}.mlp_norm.scale": ("model.layers.{i}.post_attention_layernorm.weight", _SAME),
    "blocks.{i}.attn.wq": ("model.layers.{i}.self_attn.q_proj.weight", _IN_HEADS),
    "blocks.{i}.attn.wk": ("model.layers.{i}.self_attn.k_proj.weight", _IN_HEADS),
    "blocks.{i}.attn.wv": ("model.layers.{i}.self_attn.v_proj.weight", _IN_HEADS),
    "blocks.{i}.attn.wo": ("model.layers.{i}.self_attn.o_proj.weight", _OUT_HEADS),
    "blocks.{i}.attn.bq": ("model.layers.{i}.self_attn.q_proj.bias", _FLAT),
    "blocks.{i}.attn.bk": ("model.layers.{i}.self_attn.k_proj.bias", _FLAT),
    "blocks.{i}.attn.bv": ("model.layers.{i}.self_attn.v_proj.bias", _FLAT),
    "blocks.{i}.attn.q_norm.scale": ("model.layers.{i}.self_attn.q_norm.weight", _SAME),
    "blocks.{i}.attn.k_norm.scale": ("model.layers.{i}.self_attn.k_norm.weight", _SAME),
    "blocks.{i}.mlp.w_gate": ("model.layers.{i}.mlp.gate_proj.weight", _T),
    "blocks.{i}.mlp.w_up": ("model.layers.{i}.mlp.up_proj.weight", _T),
    "blocks.{i}.mlp.w_down": ("model.layers.{i}.mlp.down_proj.weight", _T),
}


def _match(name: str, table: dict[str, Any]) -> tuple[str, Any] | None:
    """(the other side's name, the table entry) for a name of this side, {i} filled in."""
    found = re.fullmatch(r"(\w+)\.(\d+)\.(.*)", name)
    key, layer = (f"{found.group(1)}.{{i}}.{found.group(3)}", found.group(2)) if found else (name, None)
    if key not in table:
        return None
    other, how = table[key]
    return other.replace("{i}", layer or ""), how


def hf_name(name: str, key: str = "--format hf") -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Our tensor name -> (HF name, the transform to HF's layout); UserError (naming `key`) if it has
    no Llama place."""
    found = _match(name, LAYOUT)
    if found is None:
        raise UserError(f"{key}: tensor {name} has no place in the Llama layout (only the default Transformer "
                        f"exports as Llama: embed, blocks.N.attn.wq/wk/wv/wo, blocks.N.mlp.w_gate/w_up/w_down, norms, "
                        f"head)")
    return found[0], found[1][0]


_BACK = {hf: (ours, how) for ours, (hf, how) in LAYOUT.items()}


def our_name(name: str) -> tuple[str, Callable[[np.ndarray, tuple[int, ...]], np.ndarray]] | None:
    """An HF tensor name -> (our name, the transform back given our shape), None if unknown."""
    found = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", name)
    key, layer = (f"model.layers.{{i}}.{found.group(2)}", found.group(1)) if found else (name, None)
    if key not in _BACK:
        return None
    ours, how = _BACK[key]
    return ours.replace("{i}", layer or ""), how[1]


def slice_reader(name: str) -> tuple[str, Callable] | None:
    """Our (whole-layer) tensor name -> (HF name, read(hf, our slices, our shape)): the slice of our tensor
    from a slice of HF's, so a device reads only the bytes it holds; None if it has no HF place."""
    found = _match(name, LAYOUT)
    return None if found is None else (found[0], found[1][2])


def source_of(step_dir: str) -> str | None:
    """The `source/` folder of the run a step belongs to (the HF folder it started from, its weights left
    out), or None for a run that started from scratch."""
    path = step_dir
    for _ in range(3):  # the step folder, checkpoints/, the run folder
        if storage.isfile(storage.join(path, families.SOURCE, CONFIG)):
            return storage.join(path, families.SOURCE)
        path = storage.dirname(path.rstrip("/"))
    return None


def export_hf(directory: str, out: str, *, step: int | None = None, dtype: str | None = None,
              max_shard_bytes: int = 0, force: bool = False, quant: str | None = None) -> list[str]:
    """A checkpoint step of the default Transformer as a Hugging Face folder of its family (quant=int8: the
    Linear weights in compressed-tensors' int8 layout, which vLLM loads); returns its files."""
    storage.check(out, "--out")
    if storage.exists(out) and not (storage.isdir(out) and (force or not storage.listdir(out))):
        raise UserError(f"--out {out} exists; pass --force to overwrite it (a folder)")
    step_dir, step, saved, entries = export_lib.prepare(directory, storage.join(out, WEIGHTS), step, dtype, True)
    recorded = ckpt_reader.saved_config(step_dir) or {}
    model = recorded.get("model")
    if not isinstance(model, dict):
        raise UserError(f"{step_dir}: its record holds no model config (a user's own model?): --format hf exports "
                        f"the default Transformer only")
    tokenizer = tok_lib.run_tokenizer(step_dir, recorded or None)  # before any tensor is written
    source = source_of(step_dir)
    # the folder appears under its name only once whole: renamed from .partial on a disk; on a store
    # (no rename) written in place, config.json last, which is what marks a folder as an export
    remote = storage.is_remote(out)
    tmp = out if remote else out.rstrip(os.sep) + ".partial"
    storage.rmtree(tmp)
    metadata: dict[str, str] = {"format": "pt"}
    names = [n for n, _, _ in entries]
    entries, read = export_lib.quantizing(step_dir, entries, saved, metadata, quant)
    quantized = json.loads(metadata.get(int8.QUANTIZED, "{}"))
    renamed, how = [], {}
    for name, shape, dt in entries:
        scales = name.endswith(int8.SCALE) and name[:-len(int8.SCALE)] in quantized
        base = name[:-len(int8.SCALE)] if scales else name
        hf, to_hf = hf_name(base)
        hf += name[len(base):]  # q_proj.weight -> q_proj.weight_scale: compressed-tensors' name for its scales
        how[hf] = (name, to_hf)
        renamed.append((hf, tuple(to_hf(np.empty(shape, np.uint8)).shape), dt))
    if quantized:  # load() and init_from dequantize by HF name
        metadata[int8.QUANTIZED] = json.dumps({hf_name(n)[0]: d for n, d in quantized.items()})
    files = safetensors_lib.write_tensors(storage.join(tmp, WEIGHTS), renamed, lambda hf, dt: np.ascontiguousarray(
        how[hf][1](read(how[hf][0], dt))), metadata, max_shard_bytes)
    torch_dtype = next((str(dt) for _, _, dt in renamed if dt != np.int8), "float32")  # int8 weights: their own config
    config = families.hf_config(model, torch_dtype, families.read_config(source) if source else None)
    if quantized:
        linear = [n for n in names if hf_name(n)[0].endswith("proj.weight") or n == "head"]
        ignored = [hf_name(n)[0].removesuffix(".weight") for n in linear if n not in quantized]
        if model.get("tie_embeddings"):  # lm_head is the embedding table, looked up and never quantized
            ignored.append("lm_head")
        act = (recorded.get("quant") or {}).get("activations", "none")
        config["quantization_config"] = int8.compressed_tensors_config(ignored, act)
    generation: dict[str, Any] = {"do_sample": False, "max_length": int(model["seq_len"])}
    if tokenizer.eot is not None and source is None:  # every document began with it, and generation stops at it
        config["bos_token_id"] = config["eos_token_id"] = generation["bos_token_id"] = \
            generation["eos_token_id"] = tokenizer.eot
    sidecars = {"generation_config.json": json.dumps(generation, indent=1), **tokenizer.files(int(model["seq_len"]))}
    if source is not None:  # the folder's own: chat template, special tokens, generation settings
        sidecars.update({name: storage.read_text(storage.join(source, name)) for name in families.SIDECARS[1:]
                         if storage.isfile(storage.join(source, name))})
    sidecars[CONFIG] = json.dumps(config, indent=1, ensure_ascii=False)  # last
    for name, text in sidecars.items():
        storage.write_text(storage.join(tmp, name), text)
        files.append(storage.join(tmp, name))
    if not remote:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return [storage.join(out, storage.basename(f)) for f in files]


def check_config(path: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """The folder's config.json must describe this model's tensors: what their shapes cannot show (how q, k
    and v split into heads and KV heads) and what only some families have (biases, q/k norms, a head)."""
    fields = families.model_fields(path)
    wq, wk = shapes.get("blocks.0.attn.wq"), shapes.get("blocks.0.attn.wk")
    problems = []
    if wq and (wq[1], wq[2]) != (fields["n_heads"], fields["head_dim"]):
        problems.append(f"num_attention_heads={fields['n_heads']} of head_dim={fields['head_dim']}, the model has "
                        f"{wq[1]} of {wq[2]} (model.n_heads, model.head_dim)")
    if wk and wk[1] != fields["n_kv_heads"]:
        problems.append(f"num_key_value_heads={fields['n_kv_heads']}, the model has {wk[1]} (model.n_kv_heads)")
    for key, name in (("qkv_bias", "blocks.0.attn.bq"), ("qk_norm", "blocks.0.attn.q_norm.scale")):
        if wq and fields[key] != (name in shapes):
            problems.append(f"model_type={fields['family']} {'has' if fields[key] else 'has no'} {name}, the model "
                            f"{'has' if name in shapes else 'has not'} (model.{key})")
    if problems:
        raise UserError(f"{path}: config.json does not match this model: {'; '.join(problems)}")


def weights_file(path: str) -> str:
    """The folder's model.safetensors, or its shards' index; UserError when it has neither."""
    index = storage.join(path, INDEX)
    if storage.isfile(index):
        return index
    if not storage.isfile(storage.join(path, WEIGHTS)):
        raise UserError(f"{path}: holds neither {WEIGHTS} nor {INDEX} (PyTorch .bin weights are not read: they "
                        f"are pickles; save the model with safetensors)")
    return storage.join(path, WEIGHTS)


def read_folder(path: str) -> tuple[dict[str, np.ndarray], dict[str, Callable]]:
    """An HF folder -> ({our name: HF array}, {our name: back(array, our shape)}); a tied model's lm_head
    copy, where a folder holds one, is left out."""
    tied = families.model_fields(path)["tie_embeddings"]
    arrays, back = {}, {}
    for name, w in safetensors_lib.load(weights_file(path)).items():
        found = our_name(name)
        if tied and name == "lm_head.weight":
            continue
        if found is None:
            raise UserError(f"{path}: tensor {name} is not one of the tensors this model maps")
        arrays[found[0]], back[found[0]] = w, found[1]
    return arrays, back


def reader(path: str, shapes: dict[str, tuple[int, ...]]) -> tuple[Callable[[str], np.ndarray], set[str]]:
    """warmstart's reader of an HF folder: tensors by our names in our layout (shapes: our shapes)."""
    check_config(path, shapes)
    arrays, back = read_folder(path)

    def read(name: str) -> np.ndarray:
        w, shape = arrays[name], shapes[name]
        if math.prod(w.shape) != math.prod(shape):
            return w  # the caller names both shapes
        return np.ascontiguousarray(back[name](w, shape))
    return read, set(arrays)


def check_model(params: Any, stacked: Any = None) -> None:
    """checkpoint.export_format=hf needs every tensor (each layer of a stacked one) to have a Llama
    place: checked before training."""
    shapes = {tensor_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in whole_layers(shapes, stacked or {}, sep="."):
        hf_name(name, "checkpoint.export_format=hf")
