"""The Hugging Face Llama layout of the default Transformer: export a checkpoint step as a folder
`LlamaForCausalLM.from_pretrained` loads (config.json, model.safetensors or its shards and index,
generation_config.json, the run's tokenizer), and read such a folder back (`checkpoint.init_from`).

The default model is a Llama: RMSNorm (eps 1e-6), rotary positions in the rotate-half form with
inverse frequencies theta^(-2i/head_dim) (HF's `rotate_half` and `inv_freq` exactly, so q and k
need no permutation), SwiGLU, no biases, untied head, one KV head per query head. Only layouts
change: our kernels are (in, out) for `x @ w`, HF's Linear weights (out, in); attention kernels
(D, H, K) and (H, K, D) flatten their heads. Each tensor is transformed as it is streamed: host
memory stays about one tensor.
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

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
RMS_EPS = 1e-6  # model.RMSNorm's epsilon

# ours -> (HF name, to HF layout, back from HF layout given our shape). {i} is the layer.
_T = (lambda w: w.T, lambda w, shape: w.T.reshape(shape))  # (in, out) kernel <-> (out, in) Linear weight
_SAME = (lambda w: w, lambda w, shape: w.reshape(shape))
_IN_HEADS = (lambda w: w.reshape(w.shape[0], -1).T, lambda w, shape: w.T.reshape(shape))  # (D, H, K) <-> (H*K, D)
_OUT_HEADS = (lambda w: w.reshape(-1, w.shape[-1]).T, lambda w, shape: w.T.reshape(shape))  # (H, K, D) <-> (D, H*K)
LAYOUT: dict[str, tuple[str, tuple[Callable, Callable]]] = {
    "embed": ("model.embed_tokens.weight", _SAME),
    "final_norm.scale": ("model.norm.weight", _SAME),
    "head": ("lm_head.weight", _T),
    "blocks.{i}.attn_norm.scale": ("model.layers.{i}.input_layernorm.weight", _SAME),
    "blocks.{i}.mlp_norm.scale": ("model.layers.{i}.post_attention_layernorm.weight", _SAME),
    "blocks.{i}.attn.wq": ("model.layers.{i}.self_attn.q_proj.weight", _IN_HEADS),
    "blocks.{i}.attn.wk": ("model.layers.{i}.self_attn.k_proj.weight", _IN_HEADS),
    "blocks.{i}.attn.wv": ("model.layers.{i}.self_attn.v_proj.weight", _IN_HEADS),
    "blocks.{i}.attn.wo": ("model.layers.{i}.self_attn.o_proj.weight", _OUT_HEADS),
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
    """An HF Llama tensor name -> (our name, the transform back given our shape), None if unknown."""
    found = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", name)
    key, layer = (f"model.layers.{{i}}.{found.group(2)}", found.group(1)) if found else (name, None)
    if key not in _BACK:
        return None
    ours, how = _BACK[key]
    return ours.replace("{i}", layer or ""), how[1]


def llama_config(model: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json of LlamaForCausalLM for a saved `model` config section."""
    D, H = int(model["d_model"]), int(model["n_heads"])
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
            "intermediate_size": int(model["d_ff"]), "num_attention_heads": H, "num_key_value_heads": H,
            "head_dim": D // H, "num_hidden_layers": int(model["n_layers"]), "rope_theta": float(model["rope_theta"]),
            "rms_norm_eps": RMS_EPS, "vocab_size": int(model["vocab_size"]),
            "max_position_embeddings": int(model["seq_len"]), "tie_word_embeddings": False, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype, "bos_token_id": None,
            "eos_token_id": None, "pad_token_id": None}


def export_hf(directory: str, out: str, *, step: int | None = None, dtype: str | None = None,
              max_shard_bytes: int = 0, force: bool = False, quant: str | None = None) -> list[str]:
    """A checkpoint step of the default Transformer as a Hugging Face Llama folder (quant=int8: the
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
    config = llama_config(model, torch_dtype)
    if quantized:
        linear = [n for n in names if hf_name(n)[0].endswith("proj.weight") or n == "head"]
        ignored = [hf_name(n)[0].removesuffix(".weight") for n in linear if n not in quantized]
        act = (recorded.get("quant") or {}).get("activations", "none")
        config["quantization_config"] = int8.compressed_tensors_config(ignored, act)
    generation: dict[str, Any] = {"do_sample": False, "max_length": int(model["seq_len"])}
    if tokenizer.eot is not None:  # every document began with it, and generation stops at it
        config["bos_token_id"] = config["eos_token_id"] = generation["bos_token_id"] = \
            generation["eos_token_id"] = tokenizer.eot
    sidecars = {"generation_config.json": json.dumps(generation, indent=1),
                **tokenizer.files(int(model["seq_len"])),
                CONFIG: json.dumps(config, indent=1, ensure_ascii=False)}  # last
    for name, text in sidecars.items():
        storage.write_text(storage.join(tmp, name), text)
        files.append(storage.join(tmp, name))
    if not remote:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return [storage.join(out, storage.basename(f)) for f in files]


def is_hf_folder(path: str) -> bool:
    """Whether `path` is a folder holding a Hugging Face Llama export."""
    if not storage.isfile(storage.join(path, CONFIG)):
        return False
    try:
        return json.loads(storage.read_text(storage.join(path, CONFIG))).get("model_type") == "llama"
    except (OSError, ValueError, AttributeError):
        return False


def check_config(path: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """The folder's config.json must describe this architecture: what the tensors' shapes cannot show
    (how q/k/v split into heads, grouped KV heads, rotary scaling, the norm's epsilon)."""
    c = json.loads(storage.read_text(storage.join(path, CONFIG)))
    heads = shapes.get("blocks.0.attn.wq", (0, 0))[1]
    problems = []
    if heads and c.get("num_attention_heads") != heads:
        problems.append(f"num_attention_heads={c.get('num_attention_heads')}, the model has {heads} (model.n_heads)")
    if c.get("num_key_value_heads", c.get("num_attention_heads")) != c.get("num_attention_heads"):
        problems.append(f"num_key_value_heads={c.get('num_key_value_heads')} (grouped KV heads: this model has one "
                        f"per query head)")
    if c.get("rope_scaling"):
        problems.append(f"rope_scaling={c['rope_scaling']} (this model's rotary positions are unscaled)")
    if c.get("rms_norm_eps", RMS_EPS) != RMS_EPS:
        problems.append(f"rms_norm_eps={c['rms_norm_eps']} (this model's is {RMS_EPS})")
    if problems:
        raise UserError(f"{path}: config.json does not match this model: {'; '.join(problems)}")


def read_folder(path: str) -> tuple[dict[str, np.ndarray], dict[str, Callable]]:
    """An HF Llama folder -> ({our name: HF array}, {our name: back(array, our shape)})."""
    weights = storage.join(path, INDEX) if storage.isfile(storage.join(path, INDEX)) else storage.join(path, WEIGHTS)
    arrays, back = {}, {}
    for name, w in safetensors_lib.load(weights).items():
        found = our_name(name)
        if found is None:
            raise UserError(f"{path}: tensor {name} is not one of the Llama tensors this model maps")
        arrays[found[0]], back[found[0]] = w, found[1]
    return arrays, back


def reader(path: str, shapes: dict[str, tuple[int, ...]]) -> tuple[Callable[[str], np.ndarray], set[str]]:
    """warmstart's reader of an HF folder: tensors by our names in our layout (shapes: our shapes).
    rope_theta and seq_len come from the run's own config (model.rope_theta: set it to the folder's)."""
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
