"""Compressed forms of pruned tensors (pure numpy): values plus a packed bitmask, or N:M values plus
in-group indices (groups along the dimension pruning used: `axis`, 0 when absent); and the exact inverse.

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


def nm_of(nz: np.ndarray, pattern: tuple[int, int] | None) -> tuple[int, int, int] | None:
    """(N, M, axis) when every group of M along `axis` holds at most N nonzeros (the configured
    pattern), or, with no pattern, when every group of some M in NM_DETECT holds exactly the same
    N <= M/2. Axes are tried from dim 0 (a Linear's input features), then the rest (a Conv's input
    channels sit at dim -2)."""
    if nz.ndim < 2 or nz.size == 0:
        return None
    for axis in range(nz.ndim):
        found = _nm_along_0(np.moveaxis(nz, axis, 0), pattern)
        if found is not None:
            return (*found, axis)
    return None


def _nm_along_0(nz: np.ndarray, pattern: tuple[int, int] | None) -> tuple[int, int] | None:
    """nm_of along dim 0 only."""
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
        keep, m, axis = nm
        nz_g, w_g = _groups(np.moveaxis(nz, axis, 0), m), _groups(np.moveaxis(w, axis, 0), m)
        # per group, the positions of its nonzeros first (stable, so in order), padded with zero positions
        idx = np.argsort(~nz_g, axis=1, kind="stable")[:, :keep]
        values = np.take_along_axis(w_g, idx, axis=1)
        return ([(f"{name}.values", values.reshape(-1)), (f"{name}.indices", idx.astype(np.uint8).reshape(-1))],
                {"encoding": "nm", "n": keep, "m": m, **({"axis": axis} if axis else {}), **how})
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
    return pieces, {"encoding": "bitmask", "n": 256, "m": 256, "axis": 8, "shape": list(shape),
                    "dtype": str(np.dtype(dtype))}


Stored = Callable[[str], "tuple[tuple[int, ...], np.dtype] | None"]  # a piece's (shape, dtype) from the header


def check(how: Any, stored: Stored) -> None:
    """Validate rebuild info read from a file against the pieces its header lists, before anything is
    allocated: every size follows from the pieces' byte counts, so a small file cannot ask for a big
    tensor. Raises ValueError saying what is wrong."""
    if not isinstance(how, dict) or how.get("encoding") not in ("bitmask", "nm"):
        raise ValueError(f"encoding is {how.get('encoding') if isinstance(how, dict) else how!r}, not bitmask or nm")
    shape = how.get("shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and
            all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"shape {shape!r} is not a list of 1 to 8 non-negative integers")
    n = math.prod(shape)
    values = stored("values")
    if values is None or len(values[0]) != 1:
        raise ValueError("its .values piece is missing or not 1-D")
    if str(values[1]) != how.get("dtype"):
        raise ValueError(f"dtype {how.get('dtype')!r} differs from its values' {values[1]}")
    k = values[0][0]
    if how["encoding"] == "bitmask":
        mask = stored("mask")
        if mask is None or mask[1] != np.uint8 or tuple(mask[0]) != ((n + 7) // 8,):
            raise ValueError(f"its .mask piece is missing or not {(n + 7) // 8} bytes for shape {shape}")
        if k > n:
            raise ValueError(f"{k} values for {n} entries")
        return
    keep, m = how.get("n"), how.get("m")
    if not (isinstance(keep, int) and isinstance(m, int) and 0 < keep < m <= 256):
        raise ValueError(f"N:M = {keep!r}:{m!r} is not 0 < N < M <= 256")
    axis = how.get("axis", 0)
    if not (isinstance(axis, int) and not isinstance(axis, bool) and 0 <= axis < len(shape)):
        raise ValueError(f"axis {axis!r} is not a dimension of shape {shape}")
    if shape[axis] % m or k != n // m * keep:
        raise ValueError(f"shape {shape} with {keep}:{m} along dim {axis} does not hold {k} values")
    indices = stored("indices")
    if indices is None or indices[1] != np.uint8 or tuple(indices[0]) != (k,):
        raise ValueError(f"its .indices piece is missing or not {k} uint8 entries")


def decode(how: dict[str, Any], piece: Callable[[str], np.ndarray]) -> np.ndarray:
    """The dense tensor from its rebuild info and a getter of its pieces ('values', 'mask', 'indices')."""
    shape = tuple(how["shape"])
    values = piece("values")
    dtype = values.dtype
    if how["encoding"] == "bitmask":
        n = math.prod(shape)
        out = np.zeros(n, dtype)
        where = np.unpackbits(piece("mask"), count=n).astype(bool)
        if int(where.sum()) != values.size:
            raise ValueError(f"its mask marks {int(where.sum())} entries for {values.size} values")
        out[where] = values
        return out.reshape(shape)
    if how["encoding"] == "nm":
        keep, m, axis = int(how["n"]), int(how["m"]), int(how.get("axis", 0))
        moved = (shape[axis],) + shape[:axis] + shape[axis + 1:]  # the grouped axis first, as encoded
        out = np.zeros((moved[0] // m, m, math.prod(moved[1:])), dtype)
        idx = piece("indices").astype(np.intp).reshape(moved[0] // m, keep, -1)
        if idx.size and int(idx.max()) >= m:
            raise ValueError(f"an index {int(idx.max())} is outside its group of {m}")
        np.put_along_axis(out, idx, values.reshape(idx.shape), axis=1)
        return np.moveaxis(out.reshape(moved), 0, axis)
    raise ValueError(f"unknown sparse encoding {how['encoding']!r}")
