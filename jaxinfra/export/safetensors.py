"""Our safetensors files: the header and dtype tags, writing tensors one at a time into one file or shards of at most
a size with their index (never a partial file left at the final name), and reading them back: dense, sparse-stored
or int8 tensors, each as dense arrays."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError, naming, one_line
from jaxinfra.export import int8, sparse
from jaxinfra.settings.sections import DTYPES

# dtype name -> (safetensors tag, numpy type) of every dtype an export may hold
SAFETENSORS = {"float32": ("F32", np.float32), "bfloat16": ("BF16", ml_dtypes.bfloat16),
               "float16": ("F16", np.float16), "int32": ("I32", np.int32), "int64": ("I64", np.int64),
               "uint8": ("U8", np.uint8), "int8": ("I8", np.int8), "bool": ("BOOL", np.bool_)}


TAGS = {np.dtype(t): tag for tag, t in SAFETENSORS.values()}  # numpy dtype -> safetensors dtype tag


ENCODING = "encoding."  # __metadata__ key prefix: how to rebuild one sparse-stored tensor


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


def header(entries: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict[str, str],
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
    return 8 + len(header(entries, metadata)) + sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in entries)


def write_file(path: str, entries: list[tuple[str, tuple[int, ...], np.dtype]], arrays: Iterator[np.ndarray],
                metadata: dict[str, str]) -> None:
    """Stream one safetensors file: header from (name, shape, dtype), then each array's bytes as it arrives."""
    raw = header(entries, metadata)
    with partial_file(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in arrays:
            data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # its bytes, not a copy of them
            for i in range(0, data.size, 1 << 20):  # a store's buffer takes copies: hand it 1 MiB at a time
                f.write(memoryview(data[i:i + (1 << 20)]))
            del arr, data  # not held while the next one is read


@contextlib.contextmanager
def partial_file(path: str) -> Iterator[Any]:
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
        with naming(tmp), open(tmp, "wb") as f:  # a full disk names the file, not just the errno
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
        write_file(path, sel, (read(n, dt) for n, _, dt in sel), metadata)
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
