"""A digest of an array's bytes that does not depend on how the array is sharded, computed where the
array lives: on the devices inside jit (each device digests its shard, one uint32 all-reduce), or on
the host from a numpy array. Checkpoints record it per tensor at save and verify it on every read.

digest(x) = sum over elements i of (bits_i XOR mix_i) * (mix_i | 1)  (mod 2^32), where bits_i is the
element's bit pattern (in 32-bit words) and mix_i a hash of its flat index. Addition mod 2^32 is
associative and commutative, so any sharding and any reduction order give the same value; and since
(mix | 1) is odd, multiplying by it is a bijection mod 2^32: changing any one element always changes
the digest (several changed elements collide with chance about 2^-32).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN, _OFFSET = 0x9E3779B1, 0x7F4A7C15


def _words_jnp(x: jax.Array) -> jax.Array:
    """The element bits as uint32 words: (..., words per element)."""
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing dim of 2
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)[..., None]


def _index_jnp(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index (mod 2^32) of every word, from iotas: each shard computes its own part."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2 ** 32)
        stride *= shape[d]
    return idx


def device_digest(x: jax.Array) -> jax.Array:
    """The digest of one array, as a uint32 scalar (call inside jit; the array may be sharded)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = _words_jnp(x)
    mix = _index_jnp(words.shape) * jnp.uint32(_GOLDEN) + jnp.uint32(_OFFSET)
    return jnp.sum((words ^ mix) * (mix | jnp.uint32(1)), dtype=jnp.uint32)


SLICE = 1 << 16  # elements digested at a time on the host: the temporaries are ~6x the slice, not the tensor


def host_digest(x: np.ndarray) -> int:
    """The same digest of a host array, a slice of its flat elements at a time (the digest is a sum
    over elements, so slices add up; memory stays bounded however large the tensor)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    size = flat.dtype.itemsize
    per = 2 if size == 8 else 1  # 32-bit words per element
    total = 0
    for start in range(0, flat.size, SLICE):
        part = flat[start:start + SLICE]
        words = part.view(np.uint32) if size == 8 else \
            part.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size]).astype(np.uint32)
        with np.errstate(over="ignore"):
            mix = np.arange(start * per, start * per + words.size, dtype=np.uint64).astype(np.uint32)
            mix *= np.uint32(_GOLDEN)
            mix += np.uint32(_OFFSET)
            words = (words ^ mix) * (mix | np.uint32(1))
        total += int(np.sum(words, dtype=np.uint64))
    return total & 0xFFFFFFFF


@jax.jit
def tree_digests(tree: Any) -> Any:
    """device_digest of every leaf of a pytree (one compiled pass over the state)."""
    return jax.tree.map(device_digest, tree)
