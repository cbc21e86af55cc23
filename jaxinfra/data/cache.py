"""The token cache: a corpus tokenized once into flat token files, memory-mapped, under a folder named by
a fingerprint of its files (names, sizes, modification times or etags) and the tokenizer. Each process
tokenizes a contiguous share of the files into its own part; the parts, read in order, are the stream
one process would have written, so batches do not depend on the process count."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxinfra.core.errors import UserError, naming
from jaxinfra.data.documents import DocFile, documents
from jaxinfra.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

VERSION = 1  # of the layout below: a change makes a new fingerprint
BATCH_BYTES = 4 << 20  # documents encoded per encode_batch call (tokenizers spreads one call over the cores)
META = "meta.json"  # written last: a cache folder without it is not a cache


def is_heldout(key: str, percent: float) -> bool:
    """Deterministic held-out choice from a hash of a document's key (its relative path, or path and row)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 10_000
    return bucket < percent * 100


@dataclass(frozen=True)
class Plan:
    """What to tokenize: the corpus files, the held-out rule, the text field."""

    files: tuple[DocFile, ...]
    heldout_files: tuple[DocFile, ...] = ()  # data.heldout_path: every document held out, none of `files`
    heldout_percent: float = 1.0
    text_key: str = "text"

    @property
    def tail_cut(self) -> int | None:
        """Where the held-out tail starts in the concatenated bytes when no file hashes into the held-out set
        (one file, or a few): the byte corpus's old rule. None when files are held out by hash, rows or path."""
        if self.heldout_files or self.heldout_percent <= 0 or any(f.rows for f in self.files):
            return None
        if len(self.files) > 1 and any(is_heldout(f.rel, self.heldout_percent) for f in self.files):
            return None
        total = sum(f.size for f in self.files)
        return int(total * (1 - max(self.heldout_percent, 1.0) / 100))

    def fingerprint(self, tokenizer: Tokenizer) -> str:
        """The cache key: every input of the token stream."""
        desc = {"v": VERSION, "tokenizer": tokenizer.fingerprint, "percent": self.heldout_percent,
                "key": self.text_key, "files": [[f.uri, f.size, f.stamp] for f in self.files],
                "heldout": [[f.uri, f.size, f.stamp] for f in self.heldout_files]}
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:20]


def split_documents(plan: Plan, files: tuple[DocFile, ...] | None = None) -> Iterator[tuple[str, bool, bytes]]:
    """(key, held out?, raw bytes) of each non-empty document of `files` (default: all of the plan's), in order."""
    cut = plan.tail_cut
    starts = dict(zip(plan.files, np.cumsum([0] + [f.size for f in plan.files]).tolist()))  # bytes before each file
    for f in plan.files + plan.heldout_files if files is None else files:
        held_file = f in plan.heldout_files
        for row, raw in documents(f, plan.text_key):
            key = f"{f.rel}:{row}" if f.rows else f.rel
            if held_file or plan.heldout_files:  # data.heldout_path: its documents, and only those, held out
                parts = [(held_file, raw)]
            elif f.rows:
                parts = [(is_heldout(key, plan.heldout_percent), raw)]
            elif cut is None:
                parts = [(len(plan.files) > 1 and is_heldout(key, plan.heldout_percent), raw)]
            else:  # the old byte corpus: the tail of the concatenated files is held out
                at = min(max(cut - starts[f], 0), len(raw))
                parts = [(False, raw[:at]), (True, raw[at:])]
            for held, data in parts:
                if data:
                    yield key, held, data


def shares(files: tuple[DocFile, ...], count: int) -> list[tuple[DocFile, ...]]:
    """`files` cut into `count` contiguous runs of about equal bytes (a process tokenizes one)."""
    ends = np.cumsum([f.size for f in files])
    total = int(ends[-1]) if len(ends) else 0
    bounds = [0] + [int(np.searchsorted(ends, total * k / count, side="right")) for k in range(1, count)] + [len(files)]
    bounds = list(np.maximum.accumulate(bounds))
    return [files[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class _PartWriter:
    """One process's token files for one split: tokens, document starts, bytes of text (and held-out text)."""

    def __init__(self, folder: str, name: str, dtype: np.dtype, keep_text: bool):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.tokens = open(os.path.join(folder, f"{name}.tokens"), "wb")
        self.text = open(os.path.join(folder, f"{name}.text"), "wb") if keep_text else None
        self.starts: list[int] = []
        self.n_tokens = self.n_bytes = 0

    def add(self, ids: np.ndarray, raw: bytes, eot: int | None) -> None:
        self.starts.append(self.n_tokens)
        if eot is not None:  # every document begins with end-of-text: the boundary a compressor encodes too
            ids = np.concatenate([np.array([eot], np.int32), ids])
        self.tokens.write(ids.astype(self.dtype).tobytes())
        self.n_tokens += len(ids)
        self.n_bytes += len(raw)
        if self.text is not None:
            self.text.write(raw)

    def close(self) -> dict[str, int]:
        self.tokens.close()
        if self.text is not None:
            self.text.close()
        np.save(os.path.join(self.folder, f"{self.name}.starts.npy"), np.asarray(self.starts, np.int64))
        return {"tokens": self.n_tokens, "bytes": self.n_bytes, "docs": len(self.starts)}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65_536 else np.uint32)


class _Progress:
    """Bytes tokenized: a bar on a terminal, a plain line every 15 s otherwise."""

    def __init__(self, total: int, show: bool):
        self.total, self.done, self.show, self.last = total, 0, show, time.monotonic()
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", leave=False) \
            if show and sys.stderr.isatty() else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.show and time.monotonic() - self.last > 15:
            self.last = time.monotonic()
            log.info(f"tokenizing: {self.done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_part(plan: Plan, share: tuple[DocFile, ...], tokenizer: Tokenizer, folder: str, part: int,
                show: bool) -> dict:
    """Tokenize one share of the files into `part`'s files; returns its counts."""
    dtype = token_dtype(tokenizer.vocab_size)
    out = {False: _PartWriter(folder, f"{part}.train", dtype, False),
           True: _PartWriter(folder, f"{part}.heldout", dtype, True)}
    bad = {"docs": 0, "bytes": 0, "first": ""}
    progress = _Progress(sum(f.size for f in share), show)
    pending: list[tuple[str, bool, bytes]] = []

    def flush() -> None:
        for (key, held, raw), ids in zip(pending, tokenizer.encode_batch([raw for _, _, raw in pending])):
            out[held].add(ids, raw, tokenizer.eot)
            if tokenizer.impl is not None:
                _count_invalid(raw, key, bad)
        progress.update(sum(len(raw) for _, _, raw in pending))
        pending.clear()

    size = 0
    for doc in (split_documents(plan, share) if share else ()):
        pending.append(doc)
        size += len(doc[2])
        if size >= BATCH_BYTES:
            flush()
            size = 0
    flush()
    progress.close()
    return {"train": out[False].close(), "heldout": out[True].close(), "invalid_utf8": bad}


def _count_invalid(raw: bytes, key: str, bad: dict) -> None:
    """Count a document's invalid UTF-8 bytes (a text tokenizer sees each as U+FFFD)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad["docs"] += 1
        bad["bytes"] += len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))
        bad["first"] = bad["first"] or f"{key} at byte {e.start}"


class Tokens:
    """The parts' token files as one read-only 1-D array: `x[a:b]` reads only those tokens."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = [a for a in arrays if a.size] or arrays[:1]
        self.starts = np.cumsum([0] + [a.size for a in self.arrays])
        self.size = int(self.starts[-1])
        self.dtype = self.arrays[0].dtype

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.size)
        if len(self.arrays) == 1:
            return self.arrays[0][start:stop]
        out = []
        while start < stop:
            k = int(np.searchsorted(self.starts, start, side="right")) - 1
            take = min(stop, int(self.starts[k + 1])) - start
            off = start - int(self.starts[k])
            out.append(self.arrays[k][off:off + take])
            start += take
        return np.concatenate(out) if out else self.arrays[0][:0]


class Split(NamedTuple):
    """One split of a tokenized corpus."""

    tokens: Tokens | np.ndarray
    starts: np.ndarray  # int64: the token where each document begins (its end-of-text, when it has one)
    n_bytes: int  # bytes of text of its documents: the denominator of bits per byte


class Cache(NamedTuple):
    """A tokenized corpus, read from its cache folder."""

    folder: str
    train: Split
    heldout: Split
    heldout_text: bytes  # the held-out documents' bytes, for the compressors' yardsticks
    meta: dict


def _open(folder: str) -> Cache:
    """Memory-map a finished cache folder."""
    with open(os.path.join(folder, META)) as f:
        meta = json.load(f)
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for name in ("train", "heldout"):
        arrays, starts, offset = [], [], 0
        for p in range(meta["parts"]):
            path = os.path.join(folder, f"{p}.{name}.tokens")
            arrays.append(np.memmap(path, dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype))
            starts.append(np.load(os.path.join(folder, f"{p}.{name}.starts.npy")) + offset)
            offset += arrays[-1].size
        tokens = Tokens(arrays) if name == "train" else np.concatenate(arrays)
        splits[name] = Split(tokens, np.concatenate(starts), meta[name]["bytes"])
    text = b"".join(open(os.path.join(folder, f"{p}.heldout.text"), "rb").read() for p in range(meta["parts"]))
    return Cache(folder, splits["train"], splits["heldout"], text, meta)


def _sync(name: str) -> None:
    """Wait for every process (a no-op for one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def all_or_none(error: UserError | None, what: str) -> None:
    """Every process says whether its part of `what` went well (a collective, so also a barrier): one that did not
    makes all stop, with its own error on it and a UserError naming it on the others, where a sync would wait for
    it forever. Raises `error` itself when given."""
    if jax.process_count() > 1:
        failed_P = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
        if error is None and failed_P.any():
            raise UserError(f"data: process {int(np.argmax(failed_P))} failed to {what} (its own error line says why)")
    if error is not None:
        raise error


def build(plan: Plan, tokenizer: Tokenizer, root: str) -> Cache:
    """The corpus's token cache under `root`: reused when its fingerprint's folder is there, else written
    (each process its share of the files) and then read. Raises UserError for a bad file (documents())."""
    fp = plan.fingerprint(tokenizer)
    folder = os.path.join(root, f"tokens-{fp}")
    os.makedirs(root, exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        if jax.process_index() == 0:  # another run writing the same cache: wait for it, then read its cache
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _built(plan, tokenizer, folder, fp)


def _built(plan: Plan, tokenizer: Tokenizer, folder: str, fp: str) -> Cache:
    """The cache folder read, written first unless there (under build's lock on the first process)."""
    P, p = jax.process_count(), jax.process_index()
    if os.path.exists(os.path.join(folder, META)):
        log.info(f"token cache {folder}: reused")
        return _open(folder)
    tmp = f"{folder}.partial"
    if p == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a run killed while writing it
        os.makedirs(tmp)
    _sync(f"jaxinfra token cache {fp} begun")
    t0 = time.perf_counter()
    try:
        with naming(tmp):  # a full disk names the cache folder
            counts = _write_part(plan, shares(plan.files + plan.heldout_files, P)[p], tokenizer, tmp, p, show=p == 0)
            with open(os.path.join(tmp, f"{p}.json"), "w") as f:
                json.dump(counts, f)
    except UserError as e:  # a bad file in this process's share stops every process, none waits forever
        all_or_none(e, "tokenize its share of the corpus")
    all_or_none(None, "tokenize its share of the corpus")
    if p == 0:
        parts = [json.load(open(os.path.join(tmp, f"{q}.json"))) for q in range(P)]
        total = {s: {k: sum(c[s][k] for c in parts) for k in ("tokens", "bytes", "docs")} for s in ("train", "heldout")}
        bad = [c["invalid_utf8"] for c in parts]
        meta = {"version": VERSION, "fingerprint": fp, "tokenizer": tokenizer.fingerprint, "parts": P,
                "dtype": token_dtype(tokenizer.vocab_size).str, **total,
                "invalid_utf8": {"docs": sum(b["docs"] for b in bad), "bytes": sum(b["bytes"] for b in bad),
                                 "first": next((b["first"] for b in bad if b["first"]), "")}}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, folder)
        secs = time.perf_counter() - t0
        n_bytes = total["train"]["bytes"] + total["heldout"]["bytes"]
        log.info(f"token cache {folder}: {total['train']['tokens'] + total['heldout']['tokens']:,} tokens of "
                 f"{n_bytes:,} bytes in {secs:.1f} s ({n_bytes / max(secs, 1e-9) / 1e6:.1f} MB/s)")
        if meta["invalid_utf8"]["docs"]:
            u = meta["invalid_utf8"]
            log.warning(f"data: {u['docs']} documents hold invalid UTF-8 ({u['bytes']} bytes, first: {u['first']}); "
                        f"{tokenizer.name} read each invalid byte as U+FFFD (bits per byte still count the raw bytes)")
    _sync(f"jaxinfra token cache {fp} done")
    if not os.path.exists(os.path.join(folder, META)):
        raise UserError(f"data.cache: the token cache {folder} is not on a file system every process sees")
    return _open(folder)
