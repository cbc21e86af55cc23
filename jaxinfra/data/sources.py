"""Any random-access source of examples, checked, shuffled by a seeded grain pipeline and batched: each process reads
its own rows of each global batch, placed onto the mesh as one global array (the byte corpus: corpus.py)."""
from __future__ import annotations

import sys
from typing import Any, Iterator, Mapping

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxinfra.core.errors import UserError

Source = Any  # random access: len(source) and source[i] -> dict of numpy arrays (grain.MapDataset, a list, ...)


def check_source(source: Source, name: str) -> None:
    """A trainable source has a finite length and integer indexing; raises UserError naming it."""
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise UserError(f"{name}: expected a random-access source with len() and [i] (grain.MapDataset.source("
                        f"...), a grain RandomAccessDataSource, a list), got {type(source).__name__}")
    try:
        n = len(source)
    except Exception as e:  # grain raises for infinite (repeated) datasets
        raise UserError(f"{name}: len() failed ({str(e).splitlines()[0][:120]}); pass a finite source") from None
    if n < 1:
        raise UserError(f"{name} is empty: it holds no examples")


def spec_of(example: Any, name: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The (shape, dtype) of each entry of an example, which must be a dict of arrays."""
    if not isinstance(example, Mapping) or not example:
        raise UserError(f"{name}: an example must be a non-empty dict of numpy arrays, got {type(example).__name__}")
    out = {}
    for key, value in example.items():
        a = np.asarray(value)
        if a.dtype == object:
            raise UserError(f"{name}: example entry {key!r} is not a numeric array ({type(value).__name__})")
        out[str(key)] = (a.shape, a.dtype)
    return out


def check_example(example: Any, spec: Mapping[str, tuple[tuple[int, ...], Any]], name: str, index: int,
                  expected: str = "as example 0") -> None:
    """Same keys, shapes and dtypes as `spec`; raises UserError naming the source, example and key."""
    got = spec_of(example, f"{name} example {index}")
    if set(got) != set(spec):
        raise UserError(f"{name} example {index} has keys {sorted(got)}, expected {sorted(spec)} ({expected})")
    for key, (shape, dtype) in spec.items():
        if got[key][0] != tuple(shape) or got[key][1] != np.dtype(dtype):
            raise UserError(f"{name} example {index}: {key!r} has shape {got[key][0]} and dtype {got[key][1]}, "
                            f"expected shape {tuple(shape)} and dtype {np.dtype(dtype)} ({expected})")


def train_batches(source: Source, global_batch: int, seed: int, *, start: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  spec: Mapping[str, tuple[tuple[int, ...], Any]] | None = None,
                  name: str = "train_source") -> grain.IterDataset:
    """This process's rows of global batch `start`, `start + 1`, ... (endless; reshuffled each epoch).

    `source` is any random-access source of examples (dicts of numpy arrays). The order of
    examples is a seeded permutation of the whole source, the same for any number of
    processes; global batch g is examples [g*B, (g+1)*B) of it, and process p reads only its
    rows [p*B/P, (p+1)*B/P) of each. So losses do not depend on the process count, and the data
    position of a resumed run is just the batch index, on any number of processes. With `spec`,
    every example read is checked against it (a wrong shape or dtype raises UserError naming it).
    """
    P = jax.process_count() if process_count is None else process_count
    p = jax.process_index() if process_index is None else process_index
    if global_batch % P:
        raise UserError(f"data.batch_size={global_batch} is not divisible by the {P} processes")
    check_source(source, name)
    b = global_batch // P
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()  # new permutation per epoch

    def read(j: int) -> Any:
        i = int(order[(j // b) * global_batch + p * b + j % b])
        example = source[i]
        if spec is not None:
            check_example(example, spec, name, i)
        return example

    rows = grain.MapDataset.range(sys.maxsize // global_batch * b)
    return rows.map(read).batch(b, drop_remainder=True)[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))


def _per_leaf(tree: Any, sharding: Any) -> Any:
    """One sharding for every leaf, or a matching tree of them."""
    if isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda _: sharding, tree)
    return sharding


def _canonical(x: Any) -> np.ndarray:
    """A host array in the dtype JAX will hold it in (int64 -> int32 unless x64 is on)."""
    x = np.asarray(x)
    return x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)


def global_batches(local_batches: Iterator[Any], sharding: Any, accum: int = 1) -> Iterator[Any]:
    """Host-local batches -> global jax.Arrays (micro-batches on a leading axis when accum > 1).

    `sharding`: one NamedSharding for every entry, or a dict of them matching the batch.
    """
    for local in local_batches:
        if accum > 1:
            local = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), local)
        yield jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, _canonical(x)),
                           local, _per_leaf(local, sharding))


def from_host(batch: Any, sharding: Any) -> Any:
    """A batch every process holds whole -> global arrays (each device copies its slice)."""
    def one(x: Any, s: NamedSharding) -> jax.Array:
        x = _canonical(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(one, batch, _per_leaf(batch, sharding))


def fixed_batches(source: Source, global_batch: int, n_batches: int, name: str = "eval_source",
                  spec: Mapping[str, tuple[tuple[int, ...], Any]] | None = None) -> list[dict[str, np.ndarray]]:
    """The first min(len(source), n_batches x global_batch) examples of `source`, in order, as whole
    host batches of global_batch; the last one holds the rest when fewer (every example is used)."""
    check_source(source, name)
    total = min(len(source), n_batches * global_batch)
    out = []
    for start in range(0, total, global_batch):
        rows = [source[i] for i in range(start, min(start + global_batch, total))]
        if spec is not None:
            for r, example in enumerate(rows):
                check_example(example, spec, name, start + r, "as train_source's examples")
        out.append({k: np.stack([np.asarray(e[k]) for e in rows]) for k in rows[0]})
    return out


