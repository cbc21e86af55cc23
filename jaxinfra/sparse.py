"""Compressed forms of pruned tensors (pure numpy): values plus a packed bitmask, or N:M values plus
in-group indices; and the exact inverse.

"Zero" means all bits zero, so -0.0 and NaN count as values and every tensor comes back bitwise.
A tensor is stored compressed only when that takes fewer bytes than the dense tensor.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

NM_DETECT = (4, 8, 16)  # group sizes tried when the checkpoint names no N:M pattern
Pieces = list[tuple[str, np.ndarray]]


def nonzero(w: np.ndarray) -> np.ndarray:
    """True where the bits of w are not all zero (so -0.0 is a value to keep)."""
    return w.view(np.dtype(f"u{w.dtype.itemsize}")) != 0


def _groups(x: np.ndarray, m: int) -> np.ndarray:
    """(d0, ...) -> (d0 / m, m, rest): groups of m consecutive entries along dim 0."""
    return x.reshape(x.shape[0] // m, m, -1)


def nm_of(nz: np.ndarray, pattern: tuple[int, int] | None) -> tuple[int, int] | None:
    """(N, M) when every group of M along dim 0 holds at most N nonzeros (the configured pattern), or,
    with no pattern, when every group of some M in NM_DETECT holds exactly the same N <= M/2."""
    if nz.ndim < 2 or nz.size == 0:
        return None
    if pattern is not None:
        n, m = pattern
        ok = m <= 256 and nz.shape[0] % m == 0 and int(_groups(nz, m).sum(axis=1).max()) <= n
        return (n, m) if ok else None
    for m in NM_DETECT:
        if nz.shape[0] % m == 0:
            counts = _groups(nz, m).sum(axis=1)
            n = int(counts.max())
            if 0 < n <= m // 2 and bool((counts == n).all()):  # exact N everywhere: N:M pruning, not chance
                return n, m
    return None


def encode(name: str, w: np.ndarray, pattern: tuple[int, int] | None = None) -> tuple[Pieces, dict[str, Any] | None]:
    """The pieces to store for tensor `name` and how to rebuild it (None: stored dense as itself)."""
    if w.ndim == 0 or w.size == 0:
        return [(name, w)], None
    nz = nonzero(w)
    b, n = w.dtype.itemsize, w.size
    how: dict[str, Any] = {"shape": list(w.shape), "dtype": str(w.dtype)}
    nm = nm_of(nz, pattern)
    if nm is not None and n // nm[1] * nm[0] * (b + 1) < n * b:
        keep, m = nm
        # per group, the positions of its nonzeros first (stable, so in order), padded with zero positions
        idx = np.argsort(~_groups(nz, m), axis=1, kind="stable")[:, :keep]
        values = np.take_along_axis(_groups(w, m), idx, axis=1)
        return ([(f"{name}.values", values.reshape(-1)), (f"{name}.indices", idx.astype(np.uint8).reshape(-1))],
                {"encoding": "nm", "n": keep, "m": m, **how})
    k = int(nz.sum())
    if k * b + (n + 7) // 8 < n * b:
        flat = nz.reshape(-1)
        return ([(f"{name}.values", w.reshape(-1)[flat]), (f"{name}.mask", np.packbits(flat))],
                {"encoding": "bitmask", **how})
    return [(name, w)], None


def bound(name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[list[tuple[str, tuple[int, ...], np.dtype]],
                                                                        dict[str, Any]]:
    """Pieces and rebuild info at least as long in a header as any that encode() can give (for a reserve)."""
    n = math.prod(shape)
    # two 1-D pieces (the longer suffix) outweigh the one dense entry, and n bounds every count in them
    pieces = [(f"{name}.values", (n,), dtype), (f"{name}.indices", (n,), np.uint8)]
    return pieces, {"encoding": "bitmask", "n": 256, "m": 256, "shape": list(shape), "dtype": str(np.dtype(dtype))}


def decode(how: dict[str, Any], piece: Callable[[str], np.ndarray]) -> np.ndarray:
    """The dense tensor from its rebuild info and a getter of its pieces ('values', 'mask', 'indices')."""
    shape = tuple(how["shape"])
    values = piece("values")
    dtype = values.dtype
    if how["encoding"] == "bitmask":
        n = math.prod(shape)
        out = np.zeros(n, dtype)
        out[np.unpackbits(piece("mask"), count=n).astype(bool)] = values
        return out.reshape(shape)
    if how["encoding"] == "nm":
        keep, m = int(how["n"]), int(how["m"])
        out = np.zeros((shape[0] // m, m, math.prod(shape[1:])), dtype)
        idx = piece("indices").astype(np.intp).reshape(shape[0] // m, keep, -1)
        np.put_along_axis(out, idx, values.reshape(idx.shape), axis=1)
        return out.reshape(shape)
    raise ValueError(f"unknown sparse encoding {how['encoding']!r}")
