"""A pruned checkpoint step exported compressed: each tensor stored dense, as values + bitmask, or as N:M values +
indices (sparse.py's encodings), whichever is smallest, in one safetensors file that load() turns back into dense.

A sparse export stores each pruned tensor as `<name>.values` plus either `<name>.mask` (np.packbits
of the nonzero positions, row-major) or, for N:M tensors, `<name>.indices` (uint8 position of each
kept value inside its group of M along the kernel's input-feature dim, `axis`); the `__metadata__` entry `encoding.<name>` holds its
shape, dtype and layout as JSON. Other tensors stay dense under their own names. "Zero" means all
bits zero, so -0.0 and NaN survive the round trip bitwise.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace
from typing import Callable, Iterable, Iterator

import numpy as np

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core import storage
from jaxinfra.export import sparse
from jaxinfra.export.safetensors import (
    ENCODING,
    file_size,
    header,
    partial_file,
    write_file,
)
from jaxinfra.export.writer import base_metadata, prepare, quantizing, tokenizer_metadata


def saved_pattern(step_dir: str) -> tuple[int, int] | None:
    """The N:M pattern a checkpoint step was pruned with (its recorded prune.pattern), if any."""
    try:
        n, m = (int(x) for x in (ckpt_reader.saved_config(step_dir) or {})["prune"]["pattern"].split(":"))
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
    return len(header(worst, worst_meta))  # a multiple of 8: the data stays aligned


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
    base = {**base_metadata(step), **tokenizer_metadata(step_dir)}  # the run's tokenizer travels with it
    entries, read = quantizing(step_dir, entries, saved, base, quant)
    if storage.is_remote(out):
        return _sparse_to_store(out, read, entries, base, pattern)
    reserve = _reserve(entries, base)
    tally = _Tally(base, pattern)
    with partial_file(out) as f:
        f.seek(8 + reserve)
        for name, _, dt in entries:
            for _, arr in tally.add(name, read(name, dt)):
                f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))  # no copy of the bytes
            arr = None  # the tensor is dropped after its pieces are out, before the next is read
        raw = header(tally.stored, tally.meta, pad_to=reserve)
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
    raw = header(sizes.stored, sizes.meta)

    def pieces() -> Iterator[np.ndarray]:  # nothing of one tensor is held while the next is read
        for name, _, dt in entries:
            yield from (arr for _, arr in tally.add(name, read(name, dt)))

    write_file(out, sizes.stored, pieces(), sizes.meta)
    summary = dataclasses_replace(tally.summary(), sparse_bytes=8 + len(raw) + sum(
        math.prod(s) * np.dtype(d).itemsize for _, s, d in tally.stored))
    return summary
