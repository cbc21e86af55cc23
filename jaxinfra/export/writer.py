"""Merge a sharded checkpoint's parameters into whole tensors in safetensors, a tensor at a time,
dense or sparse, and load such a file back onto any mesh.

The writer streams: it lays out the safetensors header from the checkpoint's metadata, then
reads one tensor from the checkpoint as a host array, appends its bytes, and drops it; the
host holds about the largest tensor, not the model.

A sparse export stores each pruned tensor as `<name>.values` plus either `<name>.mask` (np.packbits
of the nonzero positions, row-major) or, for N:M tensors, `<name>.indices` (uint8 position of each
kept value inside its group of M along the kernel's input-feature dim, `axis`); the `__metadata__` entry `encoding.<name>` holds its
shape, dtype and layout as JSON. Other tensors stay dense under their own names. "Zero" means all
bits zero, so -0.0 and NaN survive the round trip bitwise.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace
from typing import Any, Callable, Iterable, Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.export import int8
from jaxinfra.export import sparse
from jaxinfra.core import storage
from jaxinfra.settings.sections import DTYPES
from jaxinfra.core.errors import UserError, one_line

# dtype name -> (safetensors tag, numpy type) of every dtype an export may hold
SAFETENSORS = {"float32": ("F32", np.float32), "bfloat16": ("BF16", ml_dtypes.bfloat16),
               "float16": ("F16", np.float16), "int32": ("I32", np.int32), "int64": ("I64", np.int64),
               "uint8": ("U8", np.uint8), "int8": ("I8", np.int8), "bool": ("BOOL", np.bool_)}
TAGS = {np.dtype(t): tag for tag, t in SAFETENSORS.values()}  # numpy dtype -> safetensors dtype tag
ENCODING = "encoding."  # __metadata__ key prefix: how to rebuild one sparse-stored tensor
ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16", "f16": "float16", "fp16": "float16"}
EXPORTS = "exports"  # the folder of a run that holds exports/model-<step>.safetensors


FORMATS = ("safetensors", "hf")  # checkpoint.export_format and export.py --format


def export_path(run_dir: str, step: int, fmt: str = "safetensors") -> str:
    """Where a run exports `step` during training: a file, or a Hugging Face folder."""
    return storage.join(run_dir, EXPORTS, f"hf-{step}" if fmt == "hf" else f"model-{step}.safetensors")


def newest_export(run_dir: str) -> tuple[str, int] | None:
    """(path, step) of a run's newest exports/model-<step>.safetensors, if any."""
    found = [(int(m.group(1)), storage.join(run_dir, EXPORTS, p)) for p in storage.listdir(storage.join(run_dir, EXPORTS))
             if (m := re.fullmatch(r"model-(\d+)\.safetensors", p))]
    return (max(found)[1], max(found)[0]) if found else None


def _shard_plan(entries: list[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int) -> list[list[int]]:
    """Group tensors (in order) into files of at most max_bytes (a bigger tensor gets its own)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dt) in enumerate(entries):
        n = math.prod(shape) * np.dtype(dt).itemsize
        if groups[-1] and max_bytes and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def _header(entries: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict[str, str],
            pad_to: int = 0) -> bytes:
    """The safetensors header of tensors laid out in order, padded with spaces to 8 bytes (or to pad_to)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dt in entries:
        n = math.prod(shape) * np.dtype(dt).itemsize
        header[name] = {"dtype": TAGS[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad_to:
        assert len(raw) <= pad_to, (len(raw), pad_to)  # the reserve is an upper bound by construction
        return raw + b" " * (pad_to - len(raw))
    return raw + b" " * (-len(raw) % 8)


def file_size(entries: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict[str, str]) -> int:
    """Bytes of the safetensors file these tensors make, without writing it."""
    return 8 + len(_header(entries, metadata)) + sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in entries)


def _write_file(path: str, entries: list[tuple[str, tuple[int, ...], np.dtype]], arrays: Iterator[np.ndarray],
                metadata: dict[str, str]) -> None:
    """Stream one safetensors file: header from (name, shape, dtype), then each array's bytes as it arrives."""
    raw = _header(entries, metadata)
    with _partial(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in arrays:
            data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # its bytes, not a copy of them
            for i in range(0, data.size, 1 << 20):  # a store's buffer takes copies: hand it 1 MiB at a time
                f.write(memoryview(data[i:i + (1 << 20)]))
            del arr, data  # not held while the next one is read


@contextlib.contextmanager
def _partial(path: str) -> Iterator[Any]:
    """A file written as <path>.partial and renamed to `path` once whole: never a half-written file
    under the final name, and no .partial left behind when writing fails. On an object store: a
    multipart upload straight to `path`, which appears only once completed (aborted on failure)."""
    if storage.is_remote(path):
        f = storage.open_write(path)
        try:
            yield f
        except BaseException:
            storage.abort(f)
            raise
        f.close()
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".partial"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def release_freed_tensors() -> None:
    """For a process that exports (scripts/export.py calls it; the library never does): glibc's malloc
    hands blocks of 1 MiB or more back to the system when freed. Measured: glibc raises its mmap
    threshold to the largest block freed so far, so from the second tensor on TensorStore's read
    buffers come from its threads' arenas, which keep them; an export of a 258 MB model then held 6
    to 14 tensors' worth, against about 2 with this (benchmarks/export_memory.py). Process-wide, so
    an entry point's choice; nothing where MALLOC_MMAP_THRESHOLD_ already decided or malloc is not glibc's."""
    import ctypes
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
             ) -> tuple[str, int, ckpt_lib.SavedParams, list[tuple[str, tuple[int, ...], np.dtype]]]:
    """Checks shared by dense and sparse export: (step folder, step, saved params, (name, shape, dtype) to write)."""
    step_dir, step = ckpt_lib.locate(directory, step)
    if dtype is not None:
        dtype = ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype}: not one of {', '.join(list(ALIASES) + list(DTYPES))}")
    storage.check(out, "--out")
    if storage.exists(out) and not force:
        raise UserError(f"--out {out} exists; pass --force to overwrite it")
    saved = ckpt_lib.SavedParams(step_dir)
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


def quantizing(step_dir: str, entries: list[tuple[str, tuple[int, ...], np.dtype]], saved: ckpt_lib.SavedParams,
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
    metadata = base_metadata(step)
    entries, read = quantizing(step_dir, entries, saved, metadata, quant)
    return write_tensors(out, entries, read, metadata, max_shard_bytes)


def write_tensors(out: str, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                  read: Callable[[str, np.dtype], np.ndarray], metadata: dict[str, str],
                  max_shard_bytes: int = 0) -> list[str]:
    """Stream tensors (name, shape, dtype), each from read(name, dtype) when its turn comes, into
    `out` or, past max_shard_bytes, into <stem>-0000i-of-0000n.safetensors plus
    <stem>.safetensors.index.json (the Hugging Face layout); returns the files written."""
    groups = _shard_plan(entries, max_shard_bytes)
    stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
    files = [out] if len(groups) == 1 else [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                                            for i in range(len(groups))]
    for path, group in zip(files, groups):
        sel = [entries[i] for i in group]
        _write_file(path, sel, (read(n, dt) for n, _, dt in sel), metadata)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * dt.itemsize for _, s, dt in entries)},
                 "weight_map": {n: storage.basename(files[g]) for g, group in enumerate(groups)
                                for n in (entries[i][0] for i in group)}}
        storage.write_text(f"{stem}.safetensors.index.json", json.dumps(index, indent=1))
        files.append(f"{stem}.safetensors.index.json")
    return files


def iter_file(path: str, dequantize: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """(name, dense host array) of one safetensors file, dense or sparse, a tensor at a time (a file
    on a store is downloaded first, to a temporary file removed afterwards); int8 tensors come back
    dequantized, or (dequantize=False) as stored: int8 values, and their scales under name_scale."""
    if storage.is_remote(path):
        storage.check(path, "safetensors file")
        storage.reachable(path, "safetensors file")
        if not storage.isfile(path):
            raise UserError(f"{path}: no such safetensors file")
        import tempfile
        with tempfile.TemporaryDirectory(prefix="jaxinfra-read-") as tmp:
            local = os.path.join(tmp, storage.basename(path))
            storage.download(path, local)
            yield from iter_file(local, dequantize)
        return
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such safetensors file")
    try:
        f = safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise UserError(f"{path}: not a safetensors file ({str(e).splitlines()[0][:200]})") from None
    with f:
        how = _encodings(path, f)
        quantized = _quantized(path, f) if dequantize else {}
        pieces = {f"{name}.{part}" for name in how for part in ("values", "mask", "indices")}
        held: dict[str, np.ndarray] = {}  # a quantized tensor's values or scales, until both are read

        def whole(name: str, get: Callable[[], np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
            base = name[:-len(int8.SCALE)] if name.endswith(int8.SCALE) else name
            if base not in quantized:
                yield name, get()
                return
            held[name] = get()
            if base in held and base + int8.SCALE in held:
                pair = {k: held.pop(k) for k in (base, base + int8.SCALE)}
                try:
                    yield base, int8.dequantize_tensors(pair, {base: quantized[base]})[base]
                except ValueError as e:
                    raise UserError(f"{path}: {e}") from None

        for key in f.keys():
            if key not in pieces:
                yield from whole(key, lambda: f.get_tensor(key))
        for name, info in how.items():
            try:
                rebuilt = sparse.decode(info, lambda part: f.get_tensor(f"{name}.{part}"))
            except ValueError as e:
                raise UserError(f"{path}: tensor {name} cannot be rebuilt ({e})") from None
            yield from whole(name, lambda: rebuilt)
        if held:
            raise UserError(f"{path}: quantized tensor {sorted(held)[0]} has no partner (int8 values and "
                            f"{int8.SCALE} scales come in pairs)")


_BY_TAG = {tag: np.dtype(t) for tag, t in SAFETENSORS.values()}


def _piece(f: Any, keys: set[str], key: str) -> tuple[tuple[int, ...], Any] | None:
    """(shape, dtype) of a stored piece, from the header alone; None if the file has no such piece."""
    if key not in keys:
        return None
    piece = f.get_slice(key)
    return tuple(piece.get_shape()), _BY_TAG.get(piece.get_dtype(), piece.get_dtype())


def _quantized(path: str, f: Any) -> dict[str, str]:
    """{name: dtype} of a file's int8-quantized tensors, from its __metadata__ (empty if none)."""
    raw = (f.metadata() or {}).get(int8.QUANTIZED)
    if raw is None:
        return {}
    try:
        found = json.loads(raw)
        if not isinstance(found, dict) or not all(v in DTYPES for v in found.values()):
            raise ValueError(f"not a JSON object of tensor name to one of {', '.join(DTYPES)}")
    except ValueError as e:
        raise UserError(f"{path}: __metadata__ entry {int8.QUANTIZED} is not valid ({one_line(e, 200)})") from None
    return found


def _encodings(path: str, f: Any) -> dict[str, dict[str, Any]]:
    """The sparse rebuild info of a file's tensors, each checked against the header before use."""
    meta = f.metadata() or {}
    if meta.get("sparse") != "1":
        return {}
    keys = set(f.keys())
    out = {}
    for key, raw in meta.items():
        if not key.startswith(ENCODING):
            continue
        name = key[len(ENCODING):]
        try:
            info = json.loads(raw)
            sparse.check(info, lambda part: _piece(f, keys, f"{name}.{part}"))
        except ValueError as e:  # json's errors are ValueErrors too
            raise UserError(f"{path}: __metadata__ entry {key} is not a valid encoding ({one_line(e, 200)})"
                            ) from None
        out[name] = info
    return out


def load(path: str, dequantize: bool = True) -> dict[str, np.ndarray]:
    """Name -> dense host array from one safetensors file (dense or sparse) or a sharded export's
    index; int8 tensors dequantized unless dequantize=False."""
    if path.endswith(".index.json"):
        files = sorted(set(json.loads(storage.read_text(path))["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for name in files:
            out.update(load(storage.join(storage.dirname(path), name), dequantize))
        return out
    return dict(iter_file(path, dequantize))


def saved_pattern(step_dir: str) -> tuple[int, int] | None:
    """The N:M pattern a checkpoint step was pruned with (its recorded prune.pattern), if any."""
    try:
        n, m = (int(x) for x in (ckpt_lib.saved_config(step_dir) or {})["prune"]["pattern"].split(":"))
        return (n, m) if 0 < n < m else None
    except (ValueError, KeyError, TypeError, AttributeError):  # unstructured, or not ours
        return None


@dataclass
class SparseSummary:
    """What a sparse export of some tensors holds, and what the dense file would weigh."""

    params: int
    nonzeros: int  # entries that are not exactly 0 (+0.0 or -0.0)
    dense_bytes: int  # the dense safetensors file, header included
    sparse_bytes: int  # the sparse safetensors file, header included
    encodings: dict[str, str]  # name -> dense, bitmask or nm N:M


class _Tally:
    """Running contents of a sparse file (and of its dense twin) as tensors are encoded one by one."""

    def __init__(self, metadata: dict[str, str], pattern: tuple[int, int] | None):
        self.base, self.pattern = metadata, pattern
        self.dense: list[tuple[str, tuple[int, ...], np.dtype]] = []
        self.stored: list[tuple[str, tuple[int, ...], np.dtype]] = []
        self.meta = dict(metadata, sparse="1")
        self.enc: dict[str, str] = {}
        self.params = self.nonzeros = 0

    def add(self, name: str, w: np.ndarray) -> sparse.Pieces:
        """Encode one tensor; returns the pieces to write, in order."""
        self.dense.append((name, w.shape, w.dtype))
        self.params += w.size
        self.nonzeros += int(np.count_nonzero(w))
        pieces, how = sparse.encode(name, w, self.pattern)
        self.stored += [(n, a.shape, a.dtype) for n, a in pieces]
        if how is not None:
            self.meta[ENCODING + name] = json.dumps(how, separators=(",", ":"))
        self.enc[name] = "dense" if how is None else how["encoding"] + (f" {how['n']}:{how['m']}" if "m" in how else "")
        return pieces

    def summary(self) -> SparseSummary:
        """The figures so far."""
        data = sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in self.stored)
        return SparseSummary(self.params, self.nonzeros, file_size(self.dense, self.base),
                             8 + _reserve(self.dense, self.base) + data, self.enc)


def _reserve(entries: list[tuple[str, tuple[int, ...], np.dtype]], base: dict[str, str]) -> int:
    """Header bytes of a sparse file: the longest header its tensors could need, whatever their zeros
    (a function of names, shapes and dtypes alone, so the writer can stream the data behind it)."""
    worst, worst_meta = [], dict(base, sparse="1")
    for name, shape, dt in entries:
        pieces, how = sparse.bound(name, shape, dt)
        worst += pieces
        worst_meta[ENCODING + name] = json.dumps(how, separators=(",", ":"))
    return len(_header(worst, worst_meta))  # a multiple of 8: the data stays aligned


def summarize(tensors: Iterable[tuple[str, np.ndarray]], pattern: tuple[int, int] | None = None,
              metadata: dict[str, str] | None = None) -> SparseSummary:
    """Sizes of the dense and the sparse file of these tensors, computed a tensor at a time without writing."""
    tally = _Tally(metadata or {"format": "jaxinfra"}, pattern)
    for name, w in tensors:
        tally.add(name, w)
    return tally.summary()


def export_sparse(directory: str, out: str, *, step: int | None = None, dtype: str | None = None,
                  force: bool = False, pattern: tuple[int, int] | None = None, quant: str | None = None
                  ) -> SparseSummary:
    """Write a checkpoint step's parameters as one sparse safetensors file (streamed, a tensor at a time).

    Pieces are written as each tensor is encoded, after header space reserved for the longest header
    the tensors could need; the real header then goes in front, padded with spaces to that size.
    quant=int8 stores int8 values (then compressed the same way: zeros stay zeros) and scales.
    Returns the figures, sparse_bytes being the file's size.
    """
    step_dir, step, saved, entries = prepare(directory, out, step, dtype, force)
    pattern = pattern or saved_pattern(step_dir)
    base = base_metadata(step)
    entries, read = quantizing(step_dir, entries, saved, base, quant)
    if storage.is_remote(out):
        return _sparse_to_store(out, read, entries, base, pattern)
    reserve = _reserve(entries, base)
    tally = _Tally(base, pattern)
    with _partial(out) as f:
        f.seek(8 + reserve)
        for name, _, dt in entries:
            for _, arr in tally.add(name, read(name, dt)):
                f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))  # no copy of the bytes
            arr = None  # the tensor is dropped after its pieces are out, before the next is read
        raw = _header(tally.stored, tally.meta, pad_to=reserve)
        f.seek(0)
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
    summary = tally.summary()
    assert summary.sparse_bytes == os.path.getsize(out)
    return summary


def _sparse_to_store(out: str, read: Callable[[str, np.dtype], np.ndarray],
                     entries: list[tuple[str, tuple[int, ...], np.dtype]],
                     base: dict[str, str], pattern: tuple[int, int] | None) -> SparseSummary:
    """A sparse file streamed to an object store, which cannot seek back to write the header: one pass
    encodes every tensor to learn the header (keeping nothing), the second writes header and pieces."""
    sizes = _Tally(base, pattern)
    for name, _, dt in entries:
        sizes.add(name, read(name, dt))
    tally = _Tally(base, pattern)
    raw = _header(sizes.stored, sizes.meta)

    def pieces() -> Iterator[np.ndarray]:  # nothing of one tensor is held while the next is read
        for name, _, dt in entries:
            yield from (arr for _, arr in tally.add(name, read(name, dt)))

    _write_file(out, sizes.stored, pieces(), sizes.meta)
    summary = dataclasses_replace(tally.summary(), sparse_bytes=8 + len(raw) + sum(
        math.prod(s) * np.dtype(d).itemsize for _, s, d in tally.stored))
    return summary
