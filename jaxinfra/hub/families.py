"""The Hugging Face families (llama, mistral, qwen2, qwen3): each config.json field honoured, ignored (and why
that does not change the numbers) or refused, read into `model.*` keys, and written back for an export.

Both spellings of a config are read: the Hub's older one (`rope_theta`, `rope_scaling`, `torch_dtype` at the
top) and transformers 5's (`rope_parameters`, `dtype`). docs/models.md is this table in prose.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError

log = logging.getLogger(__name__)

CONFIG = "config.json"
SOURCE = "source"  # a run's copy of the folder it started from: config and tokenizer files, no weights
SIDECARS = (CONFIG, "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "chat_template.json")  # what an export takes from the source folder
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
QKV_BIAS = {"qwen2"}  # q, k and v projections always carry biases (o_proj none)
QK_NORM = {"qwen3"}  # an RMSNorm over each query and key head
# HF field -> model key, the same in every family
SIZES = {"hidden_size": "d_model", "intermediate_size": "d_ff", "num_hidden_layers": "n_layers",
         "num_attention_heads": "n_heads", "vocab_size": "vocab_size"}
# Fields that do not change what the model computes from its weights: why, for docs/models.md and the log.
IGNORED = {
    "initializer_range": "initialisation only: the weights are loaded",
    "use_cache": "an inference switch of transformers' own",
    "torch_dtype": "the tensors are cast to model.param_dtype (or from_pretrained's dtype)",
    "dtype": "the tensors are cast to model.param_dtype (or from_pretrained's dtype)",
    "bos_token_id": "token ids: kept for the export", "eos_token_id": "token ids: kept for the export",
    "pad_token_id": "token ids: kept for the export",
    "max_position_embeddings": "a bound on model.seq_len, kept for the export",
    "pretraining_tp": "splits transformers' matmuls in pieces; the same products",
    "max_window_layers": "only with use_sliding_window: true (refused)",
    "transformers_version": "bookkeeping", "architectures": "bookkeeping", "model_type": "read as the family",
    "_name_or_path": "bookkeeping", "output_attentions": "an output switch", "output_hidden_states": "an output switch",
    "return_dict": "an output switch", "chunk_size_feed_forward": "0 in these families: the MLP runs whole",
    "is_encoder_decoder": "false in these families", "id2label": "classification heads only",
    "label2id": "classification heads only", "problem_type": "classification heads only",
    "tie_encoder_decoder": "encoder-decoder models only", "attn_implementation": "transformers' kernel choice",
    "quantization_config": "refused unless it is ours (compressed-tensors int8, dequantized on load)",
}


def read_config(path: str) -> dict[str, Any]:
    """config.json of a folder, as a dict; UserError for a missing or unreadable one."""
    file = storage.join(path, CONFIG)
    try:
        config = json.loads(storage.read_text(file))
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: not a readable JSON config ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def is_hf_folder(path: str) -> bool:
    """Whether `path` is a folder with a config.json that names a model_type (a Hugging Face model folder)."""
    if not path or not storage.isfile(storage.join(path, CONFIG)):
        return False
    try:
        return "model_type" in read_config(path)
    except UserError:
        return False


def tokenizer_file(path: str) -> str:
    """The folder's tokenizer.json; UserError with a hint when it has none (a Python tokenizer is never run)."""
    file = storage.join(path, "tokenizer.json")
    if not storage.isfile(file):
        raise UserError(f"{path}: no tokenizer.json (only a fast tokenizer's file is read, never Python code): "
                        f"write one with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(FOLDER)")
    return file


def _rope(config: dict[str, Any], where: str) -> dict[str, Any]:
    """rope_theta and the scaling, from either spelling, as model keys."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or ({k: v for k, v in params.items() if k != "rope_theta"} or None)
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if not scaling:
        return out
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    name = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(scaling["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(scaling["factor"]),
                "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                "rope_original_len": int(scaling["original_max_position_embeddings"])}
    raise UserError(f"{where}: {name} rope_type={kind!r} is not supported (default, linear and llama3 are)")


def _refuse(where: str, field: str, value: Any, why: str) -> UserError:
    return UserError(f"{where}: {field}={json.dumps(value)} is not supported ({why})")


def model_fields(path: str) -> dict[str, Any]:
    """config.json of an HF folder -> `model.*` keys (family included); UserError naming the first field this
    model cannot honour. A field none of the tables knows is logged as ignored."""
    config, where = read_config(path), storage.join(path, CONFIG)
    try:
        return _fields(config, where)
    except (AttributeError, TypeError, KeyError, ValueError) as e:  # a field of another form than HF writes
        raise UserError(f"{where}: a field is missing or of an unexpected form ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None


def _fields(config: dict[str, Any], where: str) -> dict[str, Any]:
    """model_fields of a parsed config.json."""
    family = config.get("model_type")
    if family not in ARCHITECTURES:
        raise UserError(f"{where}: model_type={json.dumps(family)} is not one of the families this library loads "
                        f"({', '.join(ARCHITECTURES)})")
    missing = [k for k in SIZES if not isinstance(config.get(k), int)]
    if missing:
        raise UserError(f"{where}: {missing[0]} is missing or not an integer")
    fields: dict[str, Any] = {key: int(config[hf]) for hf, key in SIZES.items()}
    fields.update(family=family, n_kv_heads=int(config.get("num_key_value_heads") or fields["n_heads"]),
                  head_dim=int(config.get("head_dim") or fields["d_model"] // fields["n_heads"]),
                  norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                  qkv_bias=family in QKV_BIAS, qk_norm=family in QK_NORM, **_rope(config, where))
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", config["hidden_act"], "the MLP is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise _refuse(where, flag, config[flag], "no biases on o_proj or the MLP")
    if config.get("attention_dropout"):
        raise _refuse(where, "attention_dropout", config["attention_dropout"], "training here uses no dropout")
    quant = config.get("quantization_config")
    if quant and (not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors"):
        raise _refuse(where, "quantization_config.quant_method", quant.get("quant_method") if isinstance(quant, dict)
                      else quant,
                      "only our own compressed-tensors int8 is read")
    window = config.get("sliding_window")
    if family == "mistral":
        fields["sliding_window"] = int(window or 0)
    elif config.get("use_sliding_window"):
        raise _refuse(where, "use_sliding_window", True, "a window on some layers only (max_window_layers)")
    kinds = set(config.get("layer_types") or ["full_attention"])
    if kinds - {"full_attention"} and family != "mistral":
        raise _refuse(where, "layer_types", sorted(kinds), "every layer attends to the full context here")
    known = set(IGNORED) | set(SIZES) | {"num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings",
                                         "rope_theta", "rope_scaling", "rope_parameters", "hidden_act",
                                         "attention_bias", "mlp_bias", "attention_dropout", "sliding_window",
                                         "use_sliding_window", "layer_types"}
    unknown = sorted(set(config) - known)
    if unknown:
        log.info(f"{where}: ignored fields this library does not know: {', '.join(unknown)}")
    return fields


def hf_config(model: dict[str, Any], torch_dtype: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of an export: the source folder's config (token ids, max_position_embeddings, its other
    fields) with the saved `model` section's architecture written over it, in the source's spelling."""
    family = model.get("family", "llama")
    D, H = int(model["d_model"]), int(model["n_heads"])
    out = dict(source or {})
    out.update({"architectures": [ARCHITECTURES[family]], "model_type": family, "hidden_size": D,
                "intermediate_size": int(model["d_ff"]), "num_attention_heads": H,
                "num_key_value_heads": int(model.get("n_kv_heads") or H),
                "head_dim": int(model.get("head_dim") or D // H), "num_hidden_layers": int(model["n_layers"]),
                "rms_norm_eps": float(model.get("norm_eps", 1e-6)), "vocab_size": int(model["vocab_size"]),
                "tie_word_embeddings": bool(model.get("tie_embeddings", False)), "hidden_act": "silu"})
    out.setdefault("max_position_embeddings", int(model["seq_len"]))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out.setdefault(key, None)
    if family in ("llama", "qwen3"):
        out.update(attention_bias=False)
    if family == "llama":
        out.update(mlp_bias=False)
    if family == "mistral":
        out["sliding_window"] = int(model.get("sliding_window") or 0) or None
    out["dtype" if "dtype" in out else "torch_dtype"] = torch_dtype
    scaling: dict[str, Any] | None = None
    kind = model.get("rope_scaling", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(model["rope_factor"])}
    elif kind == "llama3":
        scaling = {"rope_type": "llama3", "factor": float(model["rope_factor"]),
                   "low_freq_factor": float(model["rope_low_freq_factor"]),
                   "high_freq_factor": float(model["rope_high_freq_factor"]),
                   "original_max_position_embeddings": int(model["rope_original_len"])}
    theta = float(model["rope_theta"])
    if "rope_parameters" in out:  # transformers 5's spelling
        out["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": theta}
    else:
        out.update(rope_theta=theta, rope_scaling=scaling)
    return out
