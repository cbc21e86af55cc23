"""Merge a sharded checkpoint step's parameters into whole tensors in safetensors (dense, cast, or int8), a tensor
at a time, into one file or shards with their index.

The writer streams: it lays out the safetensors header from the checkpoint's metadata, then
reads one tensor from the checkpoint as a host array, appends its bytes, and drops it; the
host holds about the largest tensor, not the model.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
from typing import Callable

import jax
import numpy as np

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core import storage
from jaxinfra.core.errors import UserError, one_line
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.export import int8
from jaxinfra.export.safetensors import SAFETENSORS, TAGS, write_tensors
from jaxinfra.settings.sections import DTYPES

ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16", "f16": "float16", "fp16": "float16"}
EXPORTS = "exports"  # the folder of a run that holds exports/model-<step>.safetensors


def export_path(run_dir: str, step: int, fmt: str = "safetensors") -> str:
    """Where a run exports `step` during training: a file, or a Hugging Face folder."""
    return storage.join(run_dir, EXPORTS, f"hf-{step}" if fmt == "hf" else f"model-{step}.safetensors")


def newest_export(run_dir: str) -> tuple[str, int] | None:
    """(path, step) of a run's newest exports/model-<step>.safetensors, if any."""
    found = [(int(m.group(1)), storage.join(run_dir, EXPORTS, p)) for p in storage.listdir(storage.join(run_dir, EXPORTS))
             if (m := re.fullmatch(r"model-(\d+)\.safetensors", p))]
    return (max(found)[1], max(found)[0]) if found else None


def release_freed_tensors() -> None:
    """For a process that exports (scripts/export.py calls it; the library never does): glibc's malloc
    hands blocks of 1 MiB or more back to the system when freed. Measured: glibc raises its mmap
    threshold to the largest block freed so far, so from the second tensor on TensorStore's read
    buffers come from its threads' arenas, which keep them; an export of a 258 MB model then held 6
    to 14 tensors' worth, against about 2 with this (benchmarks/export_memory.py). Process-wide, so
    an entry point's choice; nothing where MALLOC_MMAP_THRESHOLD_ already decided or malloc is not glibc's."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError, TypeError):
        pass


def base_metadata(step: int) -> dict[str, str]:
    """The `__metadata__` of an export of `step`."""
    return {"format": "jaxinfra", "step": str(step)}


def prepare(directory: str, out: str, step: int | None, dtype: str | None, force: bool
             ) -> tuple[str, int, ckpt_reader.SavedParams, list[tuple[str, tuple[int, ...], np.dtype]]]:
    """Checks shared by dense and sparse export: (step folder, step, saved params, (name, shape, dtype) to write)."""
    step_dir, step = ckpt_reader.locate(directory, step)
    if dtype is not None:
        dtype = ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype}: not one of {', '.join(list(ALIASES) + list(DTYPES))}")
    storage.check(out, "--out")
    if storage.exists(out) and not force:
        raise UserError(f"--out {out} exists; pass --force to overwrite it")
    saved = ckpt_reader.SavedParams(step_dir)
    entries = []
    for name, (_, _, m) in saved.entries.items():
        # jax.dtypes knows ml_dtypes' bfloat16 as a float (numpy's issubdtype does not: bf16 weights stayed bf16)
        dt = np.dtype(SAFETENSORS[dtype][1]) if dtype and jax.dtypes.issubdtype(np.dtype(m.dtype), np.floating) \
            else np.dtype(m.dtype)
        entries.append((name, tuple(m.shape), dt))
    for name, _, dt in entries:
        if dt not in TAGS:
            raise UserError(f"tensor {name} has dtype {dt}, which this exporter does not write; pass --dtype")
    return step_dir, step, saved, entries


def check_quant(quant: str | None) -> None:
    """--quant is none or int8."""
    if quant not in (None, "none", "int8"):
        raise UserError(f"--quant {quant}: not one of none, int8")


def quantizing(step_dir: str, entries: list[tuple[str, tuple[int, ...], np.dtype]], saved: ckpt_reader.SavedParams,
               metadata: dict[str, str], quant: str | None
               ) -> tuple[list[tuple[str, tuple[int, ...], np.dtype]], Callable[[str, np.dtype], np.ndarray]]:
    """The tensors to store and their reader: as saved, or (quant=int8) with the planned matmul
    weights as int8 values plus scales, recorded in `metadata` so that load() dequantizes them."""
    read = lambda name, dt: saved.read(name).astype(dt, copy=False)
    check_quant(quant)
    if quant in (None, "none"):
        return entries, read
    plan, compute_dtype = int8.export_plan(step_dir)
    metadata[int8.QUANTIZED] = json.dumps({n: str(dt) for n, _, dt in entries if n in plan},
                                                separators=(",", ":"))
    return int8.quantized_entries(entries, plan, compute_dtype), int8.QuantizedReader(read, plan,
                                                                                                compute_dtype)


def export(directory: str, out: str, *, step: int | None = None, dtype: str | None = None,
           max_shard_bytes: int = 0, force: bool = False, quant: str | None = None) -> list[str]:
    """Write the parameters of a checkpoint step as whole tensors (quant=int8: matmul weights as int8
    values and per-channel scales); returns the files written."""
    step_dir, step, saved, entries = prepare(directory, out, step, dtype, force)
    metadata = {**base_metadata(step), **tokenizer_metadata(step_dir)}
    entries, read = quantizing(step_dir, entries, saved, metadata, quant)
    return write_tensors(out, entries, read, metadata, max_shard_bytes)


def tokenizer_metadata(step_dir: str) -> dict[str, str]:
    """The `__metadata__` entry that carries the run's tokenizer: its tokenizer.json text (none for `bytes`)."""
    tokenizer = tok_lib.run_tokenizer(step_dir, ckpt_reader.saved_config(step_dir))
    return {} if tokenizer.impl is None else {tok_lib.FILE: tokenizer.json_text}


def export_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors export (a sharded one's: its first shard's), read from the header alone."""
    if path.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(storage.read_text(path))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: not a safetensors index ({one_line(e, 200)})") from None
        path = storage.join(storage.dirname(path), shards[0]) if shards else path
    if not storage.isfile(path):
        raise UserError(f"{path}: no such safetensors file")
    try:
        n = int.from_bytes(storage.read_bytes(path, 0, 8), "little")
        found = json.loads(storage.read_bytes(path, 8, 8 + n)).get("__metadata__") or {}
    except (ValueError, AttributeError) as e:
        raise UserError(f"{path}: not a safetensors file ({one_line(e, 200)})") from None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def export_tokenizer(path: str) -> tok_lib.Tokenizer | None:
    """The tokenizer a safetensors export carries; None when it carries none (`bytes`, or an export written
    before exports carried their tokenizer: its run folder's tokenizer.json is the one then)."""
    text = export_metadata(path).get(tok_lib.FILE)
    return None if text is None else tok_lib.from_json(text, f"{path} ({tok_lib.FILE} in its __metadata__)")
