"""Byte-level text corpus, a grain pipeline over it, and global batch assembly.

Default corpus: the running interpreter's standard-library .py files (no download). Files are
split into train and held-out by a hash of their path relative to the corpus root, so the split
is the same on every machine and process.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxinfra.errors import UserError


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str, percent: float) -> bool:
    """Deterministic held-out choice from a hash of the file's relative path."""
    bucket = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "little") % 10_000
    return bucket < percent * 100


@dataclass(frozen=True)
class Corpus:
    """A corpus as two byte arrays (files concatenated in sorted path order)."""

    name: str
    train: np.ndarray  # uint8
    heldout: np.ndarray  # uint8
    n_train_files: int
    n_heldout_files: int


def _files(path: str, glob: str) -> tuple[Path, list[Path]]:
    """(root, sorted files) for the stdlib (path ""), a folder (recursive glob) or one file."""
    if not path:
        root = stdlib_root()
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    elif os.path.isfile(path):
        root, files = Path(path).parent, [Path(path)]
    elif os.path.isdir(path):
        root = Path(path)
        files = [p for p in root.rglob(glob) if p.is_file()]
    else:
        raise UserError(f"data.path={path}: no such file or folder")
    return root, sorted(files)


def load_corpus(path: str = "", glob: str = "*.py", heldout_percent: float = 1.0) -> Corpus:
    """Read every file once; split by path hash. Raises UserError for a missing or empty corpus."""
    root, files = _files(path, glob)
    where = f"data.path={path or '<stdlib ' + str(root) + '>'}"
    if not files:
        raise UserError(f"{where} holds no files matching data.glob={glob}")
    train, held = [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        (held if len(files) > 1 and is_heldout(rel, heldout_percent) else train).append(f.read_bytes())
    if not held and heldout_percent > 0:  # a single file, or no path hashed into the held-out set
        data = b"".join(train)
        cut = int(len(data) * (1 - max(heldout_percent, 1.0) / 100))
        train, held = [data[:cut]], [data[cut:]]
    tr = np.frombuffer(b"".join(train), np.uint8)
    ho = np.frombuffer(b"".join(held), np.uint8)
    if tr.size == 0:
        raise UserError(f"{where}: the corpus is empty ({len(files)} files, 0 bytes)")
    return Corpus(path or "stdlib", tr, ho, len(train), len(held))


def check_sizes(corpus: Corpus, seq_len: int, batch_size: int, eval_batches: int) -> None:
    """The corpus must hold at least one global batch of windows (and one held-out window)."""
    need = seq_len + 1
    if corpus.train.size // seq_len < batch_size or corpus.train.size < need:
        raise UserError(f"data: the training corpus has {corpus.train.size} bytes, fewer than "
                        f"data.batch_size={batch_size} windows of model.seq_len={seq_len}")
    if eval_batches and corpus.heldout.size < need:
        raise UserError(f"data: the held-out split has {corpus.heldout.size} bytes, fewer than one window "
                        f"of model.seq_len+1={need}; raise data.heldout_percent or set run.eval_batches=0")


class Windows(grain.sources.RandomAccessDataSource):
    """Record i = bytes [i*seq_len, i*seq_len + seq_len + 1) as int32 tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str):
        self.tokens, self.seq_len, self.name = tokens, seq_len, name

    def __len__(self) -> int:
        return (self.tokens.size - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(i) * self.seq_len
        return {"tokens": self.tokens[start:start + self.seq_len + 1].astype(np.int32)}

    def __repr__(self) -> str:  # grain compares this when restoring an iterator: keep it stable
        return f"Windows({self.name!r}, bytes={self.tokens.size}, seq_len={self.seq_len})"


def train_batches(source: grain.sources.RandomAccessDataSource, global_batch: int, seed: int, *,
                  start: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
    """This process's rows of global batch `start`, `start + 1`, ... (endless; reshuffled each epoch).

    The order of windows is a seeded permutation of the whole corpus, the same for any number
    of processes; global batch g is windows [g*B, (g+1)*B) of it, and process p reads only its
    rows [p*B/P, (p+1)*B/P) of each. So losses do not depend on the process count, and the data
    position of a resumed run is just the batch index, on any number of processes.
    """
    P = jax.process_count() if process_count is None else process_count
    p = jax.process_index() if process_index is None else process_index
    if global_batch % P:
        raise UserError(f"data.batch_size={global_batch} is not divisible by the {P} processes")
    b = global_batch // P
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()  # new permutation per epoch
    rows = grain.MapDataset.range(sys.maxsize // global_batch * b)
    local = rows.map(lambda j: source[order[(j // b) * global_batch + p * b + j % b]])
    return local.batch(b, drop_remainder=True)[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))


def global_batches(local_batches: Iterator[Any], sharding: NamedSharding, accum: int = 1) -> Iterator[Any]:
    """Host-local batches -> global jax.Arrays (micro-batches on a leading axis when accum > 1)."""
    for local in local_batches:
        if accum > 1:
            local = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), local)
        yield jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def eval_windows(tokens: np.ndarray, seq_len: int, global_batch: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """Fixed held-out global batches, windows spread evenly over the held-out bytes."""
    starts = np.linspace(0, tokens.size - seq_len - 1, global_batch * n_batches).astype(np.int64)
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
    return [{"tokens": rows[b * global_batch:(b + 1) * global_batch]} for b in range(n_batches)]


def from_host(batch: Any, sharding: NamedSharding) -> Any:
    """A batch every process holds whole -> global arrays (each device copies its slice)."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), batch)


def compression_bpb(data: bytes | np.ndarray) -> dict[str, float]:
    """Bits per byte that zlib -9 and xz -9e reach on the same bytes: the yardsticks."""
    raw = bytes(data)
    if not raw:
        return {}
    return {"zlib_bpb": 8 * len(zlib.compress(raw, 9)) / len(raw),
            "xz_bpb": 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / len(raw)}
