"""The byte corpus of the default LM job: text files (the Python standard library by default, a folder, or s3:// and
gs:// prefixes) read as bytes, split into training and held-out files by a hash of each path, cut into windows of
seq_len + 1 tokens; and what zlib and xz make of the held-out bytes, the figures a model has to beat."""
from __future__ import annotations

import fnmatch
import hashlib
import lzma
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.data.sources import fixed_batches


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
    train: np.ndarray  # uint8 (StoredBytes for a corpus on an object store)
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


class StoredBytes:
    """The train bytes of a corpus on an object store, concatenated in path order and read lazily:
    `x[a:b]` fetches only the blocks holding those bytes (ranged GETs), so each process reads about
    its own rows' byte ranges, never the whole corpus. Quacks like the uint8 array Windows slices."""

    BLOCK = 1 << 20  # bytes per ranged GET, cached per block

    def __init__(self, files: list[tuple[str, int]]):
        self.files = [f for f in files if f[1]]
        self.starts = np.cumsum([0] + [n for _, n in self.files])
        self.size = int(self.starts[-1])
        self.dtype = np.dtype(np.uint8)
        self._cache: dict[tuple[int, int], bytes] = {}

    def _block(self, f: int, b: int) -> bytes:
        if (f, b) not in self._cache:
            if len(self._cache) >= 64:  # bounded: the oldest block goes
                self._cache.pop(next(iter(self._cache)))
            path, n = self.files[f]
            self._cache[f, b] = storage.read_bytes(path, b * self.BLOCK, min(n, (b + 1) * self.BLOCK))
        return self._cache[f, b]

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.size)
        out = []
        while start < stop:
            f = int(np.searchsorted(self.starts, start, side="right")) - 1
            off = start - int(self.starts[f])
            take = min(stop - start, self.BLOCK - off % self.BLOCK, self.files[f][1] - off)
            block = self._block(f, off // self.BLOCK)
            out.append(block[off % self.BLOCK:off % self.BLOCK + take])
            start += take
        return np.frombuffer(b"".join(out), np.uint8)


def _stored_files(path: str, glob: str) -> list[tuple[str, str, int]]:
    """(relative path, URI, size) of a store's corpus files (one object, or a prefix's matching files)."""
    storage.reachable(path, "data.path")
    if storage.isfile(path):
        return [(storage.basename(path), path, storage.size(path))]
    found = storage.walk_files(path)
    if not found:
        raise UserError(f"data.path={path}: no such file or folder")
    match = (lambda rel: fnmatch.fnmatch(rel, glob)) if "/" in glob else \
        (lambda rel: fnmatch.fnmatch(rel.rsplit("/", 1)[-1], glob))
    return [(rel, storage.join(path, rel), n) for rel, n in found if match(rel)]


def _load_stored(path: str, glob: str, heldout_percent: float) -> Corpus:
    """A corpus on an object store: the same split and order as the same files on disk; the held-out
    files are read whole (every process evaluates on them), the train files lazily (StoredBytes)."""
    files = _stored_files(path, glob)
    where = f"data.path={path}"
    if not files:
        raise UserError(f"{where} holds no files matching data.glob={glob}")
    held = [f for f in files if len(files) > 1 and is_heldout(f[0], heldout_percent)]
    train = [f for f in files if f not in held]
    if not held and heldout_percent > 0:  # as on disk: the tail of the bytes is held out
        data = b"".join(storage.read_bytes(uri) for _, uri, _ in train)
        cut = int(len(data) * (1 - max(heldout_percent, 1.0) / 100))
        tr, ho = np.frombuffer(data[:cut], np.uint8), np.frombuffer(data[cut:], np.uint8)
    else:
        tr = StoredBytes([(uri, n) for _, uri, n in train])
        ho = np.frombuffer(b"".join(storage.read_bytes(uri) for _, uri, _ in held), np.uint8)
    if tr.size == 0:
        raise UserError(f"{where}: the corpus is empty ({len(files)} files, 0 bytes)")
    return Corpus(path, tr, ho, len(train), len(held))


def load_corpus(path: str = "", glob: str = "*.py", heldout_percent: float = 1.0) -> Corpus:
    """Read every file once; split by path hash. Raises UserError for a missing or empty corpus."""
    if storage.is_remote(path):
        return _load_stored(path, glob, heldout_percent)
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


def check_corpus(corpus: Corpus, seq_len: int, batch_size: int, eval_batches: int) -> None:
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


def eval_windows(tokens: np.ndarray, seq_len: int, global_batch: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """Fixed held-out global batches, windows spread evenly over the held-out bytes."""
    return fixed_batches(HeldOutWindows(tokens, seq_len, global_batch * n_batches), global_batch, n_batches)


class HeldOutWindows(grain.sources.RandomAccessDataSource):
    """`count` windows of seq_len + 1 tokens spread evenly over the held-out bytes (fixed eval set)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, count: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.starts = np.linspace(0, tokens.size - seq_len - 1, count).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = int(self.starts[i])
        return {"tokens": self.tokens[s:s + self.seq_len + 1].astype(np.int32)}

    def __repr__(self) -> str:
        return f"HeldOutWindows(bytes={self.tokens.size}, seq_len={self.seq_len}, count={len(self.starts)})"


def compression_bpb(data: bytes | np.ndarray) -> dict[str, float]:
    """Bits per byte that zlib -9 and xz -9e reach on the same bytes: the yardsticks."""
    raw = bytes(data)
    if not raw:
        return {}
    return {"zlib_bpb": 8 * len(zlib.compress(raw, 9)) / len(raw),
            "xz_bpb": 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / len(raw)}
