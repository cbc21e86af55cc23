"""A text corpus's files, listed, and their documents, streamed: JSONL (plain, .gz, .zst) and Parquet hold one document
per row, any other file is one document of its raw bytes; local paths, s3:// and gs:// URIs alike. Nothing is read
whole but a one-document file: a 5 GB JSONL file streams through a buffer line by line, Parquet batch by batch."""
from __future__ import annotations

import fnmatch
import gzip
import importlib
import io
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError, one_line

ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
BUFFER = 1 << 20  # bytes of each read from the file (or the store: one ranged GET per block at most)
ZSTD_CHUNK = 1 << 16  # compressed bytes fed to the decompressor at a time: bounds what one call returns
PARQUET_BATCH = 256  # rows per Arrow batch: bounded by rows, not bytes, so keep it small for long documents
KEYS_NAMED = 8  # keys a missing-key message lists
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}
TEXT_EXTRA = "pip install 'jaxinfra[text]'"


def _optional(name: str) -> Any:
    """A module of the text extra, or None when it is not installed (this module imports without it)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


pa, pq, zstandard = _optional("pyarrow"), _optional("pyarrow.parquet"), _optional("zstandard")
_ZSTD_ERRORS = (zstandard.ZstdError,) if zstandard else ()


@dataclass(frozen=True)
class DocFile:
    """One corpus file: where it is, and what says whether it changed."""

    rel: str  # path relative to the corpus root, posix ("a/b.jsonl"); the basename for a single file
    uri: str  # local path or s3://... / gs://... URI
    size: int  # bytes
    stamp: str  # mtime in ns (local) or the store's ETag: a fingerprint ingredient

    @property
    def rows(self) -> bool:
        """Whether this file holds one document per row (.jsonl, .jsonl.gz, .jsonl.zst, .parquet)."""
        return self.rel.lower().endswith(ROW_SUFFIXES)


def list_files(path: str, glob: str) -> tuple[str, list[DocFile]]:
    """(corpus name, files sorted by rel): the stdlib's *.py files (path ""), one file, or a folder's files matching
    `glob`, recursively; UserError naming data.path / data.glob when there is none."""
    if storage.is_remote(path):
        files, where = _stored_files(path, glob), f"data.path={path}"
    else:
        root, found, where = _local_files(path, glob)
        files = [DocFile(p.relative_to(root).as_posix(), str(p), *storage.stat(str(p))) for p in found]
    if not files:
        raise UserError(f"{where} holds no files matching data.glob={glob}")
    return path or "stdlib", sorted(files, key=lambda f: f.rel)


def _local_files(path: str, glob: str) -> tuple[Path, list[Path], str]:
    """(root, files, the setting to name) on a local disk, chosen as corpus.py's `_files` chooses them."""
    if not path:
        root = Path(sysconfig.get_paths()["stdlib"])  # every *.py file whatever the glob, as corpus.py reads it
        found = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
        return root, found, f"data.path=<stdlib {root}>"
    storage.check(path, "data.path")
    full = Path(os.path.abspath(path))
    if full.is_file():
        return full.parent, [full], f"data.path={path}"
    if full.is_dir():
        return full, [p for p in full.rglob(glob) if p.is_file()], f"data.path={path}"
    raise UserError(f"data.path={path}: no such file or folder")


def _stored_files(path: str, glob: str) -> list[DocFile]:
    """A store's corpus files, chosen as corpus.py's `_stored_files` chooses them: one object, or those under a
    prefix whose relative path (a glob with a "/") or name matches `glob`."""
    storage.reachable(path, "data.path")
    if storage.isfile(path):
        return [DocFile(storage.basename(path), path, *storage.stat(path))]
    found = storage.walk_stamped(path)
    if not found:
        raise UserError(f"data.path={path}: no such file or folder")
    return [DocFile(rel, storage.join(path, rel), n, stamp) for rel, n, stamp in found
            if fnmatch.fnmatch(rel if "/" in glob else rel.rsplit("/", 1)[-1], glob)]


def documents(f: DocFile, text_key: str = "text") -> Iterator[tuple[int, bytes]]:
    """Streamed (row, text as UTF-8 bytes) of one file: each row of a row file (rows counted from 0, blank JSONL
    lines not counted), or (0, the raw bytes) of any other file (.gz / .zst ones decompressed)."""
    name = f.rel.lower()
    if name.endswith(".parquet"):
        yield from _parquet_rows(f.uri, text_key)
        return
    try:
        with storage.open_read(f.uri) as raw:
            stream = _decompressed(raw, f.uri, name)
            if not f.rows:
                yield 0, stream.read()
                return
            yield from _jsonl_rows(stream, f.uri, text_key)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a truncated or damaged gzip stream
        raise UserError(f"{f.uri}: corrupt gzip stream ({one_line(e, 160)})") from None
    except _ZSTD_ERRORS as e:
        raise UserError(f"{f.uri}: corrupt zstd stream ({one_line(e, 160)})") from None


def _decompressed(raw: BinaryIO, uri: str, name: str) -> BinaryIO:
    """A buffered binary stream of the file's content, decompressed by its suffix (.gz, .zst)."""
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=io.BufferedReader(raw, BUFFER), mode="rb")  # GzipFile buffers its output itself
    if name.endswith(".zst"):
        _need(zstandard, "zstandard", uri)
        return io.BufferedReader(_ZstdFrames(raw, uri), BUFFER)
    return io.BufferedReader(raw, BUFFER)  # a store's file iterates lines slowly (each readline reads a block)


def _need(module: Any, name: str, uri: str) -> None:
    """UserError naming the file and the extra when an optional reader is missing."""
    if module is None:
        raise UserError(f"{uri}: reading it needs {name}, which is not installed: {TEXT_EXTRA}")


class _ZstdFrames(io.RawIOBase):
    """The frames of a .zst stream one after another, decompressed ZSTD_CHUNK input bytes at a time. Not
    zstandard's stream_reader: it ends quietly where a truncated file ends, losing the rest without a word."""

    def __init__(self, raw: BinaryIO, uri: str):
        self.raw, self.uri = raw, uri
        self.frame: Any = None  # the decompressor of the frame in progress (None between frames)
        self.out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        """Fill `b` with decompressed bytes (0 at the end of the last whole frame)."""
        while not self.out:
            data = self.raw.read(ZSTD_CHUNK)
            if not data:
                if self.frame is not None:
                    raise UserError(f"{self.uri}: corrupt zstd stream (the file ends inside a frame: truncated)")
                return 0
            self.out = memoryview(self._feed(data))
        n = min(len(b), len(self.out))
        b[:n], self.out = self.out[:n], self.out[n:]
        return n

    def _feed(self, data: bytes) -> bytes:
        """Decompress `data`, starting a new frame's decompressor wherever one frame ends inside it."""
        out = []
        while data:
            self.frame = self.frame or zstandard.ZstdDecompressor().decompressobj()
            out.append(self.frame.decompress(data))
            data = self.frame.unused_data if self.frame.eof else b""
            if self.frame.eof:
                self.frame = None
        return b"".join(out)


def _jsonl_rows(stream: BinaryIO, uri: str, text_key: str) -> Iterator[tuple[int, bytes]]:
    """(row, text) of each non-blank line of a JSONL stream."""
    row = 0
    for line_no, line in enumerate(stream, 1):
        if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors write one)
            line = line[3:]
        if not line.strip():
            continue
        # invalid UTF-8 must not stop a run: the bytes ride through json as lone surrogates and come back unchanged
        try:
            doc = json.loads(line.decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError as e:
            raise UserError(f"{uri} line {line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(doc, dict):
            raise UserError(f"{uri} line {line_no}: a JSON {_JSON_TYPES.get(type(doc), type(doc).__name__)}, "
                            f"not an object with the key data.text_key={text_key!r}")
        if text_key not in doc:
            raise UserError(f"{uri} line {line_no}: no key data.text_key={text_key!r} (its keys: "
                            f"{_names(list(doc))}); set data.text_key to the key of the text")
        text = doc[text_key]
        if not isinstance(text, str):
            raise UserError(f"{uri} line {line_no}: data.text_key={text_key!r} holds a JSON "
                            f"{_JSON_TYPES.get(type(text), type(text).__name__)}, not a string")
        yield row, _utf8(text)
        row += 1


def _names(keys: list[str]) -> str:
    """Up to KEYS_NAMED keys as one short line."""
    shown = ", ".join(repr(k)[:40] for k in keys[:KEYS_NAMED]) or "none"  # repr: a key's newline stays one line
    return shown + (f" and {len(keys) - KEYS_NAMED} more" if len(keys) > KEYS_NAMED else "")


def _utf8(text: str) -> bytes:
    """The text's UTF-8 bytes, the file's invalid bytes (surrogate-escaped when read) back as they were."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate written as a JSON escape (half an emoji, "\ud83d"): kept as its
        # three bytes, invalid UTF-8 like any other bad byte, for the layer that counts and replaces them
        return b"".join(c.encode("utf-8", "surrogateescape" if "\udc80" <= c <= "\udcff" else "surrogatepass")
                        for c in text)


def _parquet_rows(uri: str, text_key: str) -> Iterator[tuple[int, bytes]]:
    """(row, text) of each row of a Parquet file's `text_key` column, read batch by batch."""
    _need(pq, "pyarrow", uri)
    row = 0
    with storage.open_read(uri) as raw:
        try:
            pf = pq.ParquetFile(raw)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError) as e:  # not Parquet, or damaged (its footer is read first)
            _reraise_unless_damaged(e)
            raise UserError(f"{uri}: not a readable Parquet file ({one_line(e, 160)})") from None
        if text_key not in schema.names:
            raise UserError(f"{uri}: no column data.text_key={text_key!r} (its columns: {_names(schema.names)}); "
                            f"set data.text_key to the column of the text")
        kind = schema.field(text_key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{uri}: column data.text_key={text_key!r} holds {kind}, not strings")
        try:
            for batch in pf.iter_batches(columns=[text_key], batch_size=PARQUET_BATCH):
                # as binary: the stored bytes as they are, no decoding to str and back
                for text in batch.column(0).cast(pa.large_binary()).to_pylist():
                    if text is None:
                        raise UserError(f"{uri} row {row}: data.text_key={text_key!r} is null, not a string")
                    yield row, text
                    row += 1
        except (pa.ArrowException, OSError) as e:  # a damaged page or row group
            _reraise_unless_damaged(e)
            raise UserError(f"{uri} near row {row}: corrupt Parquet data ({one_line(e, 160)})") from None


def _reraise_unless_damaged(e: Exception) -> None:
    """pyarrow reports a damaged file as ArrowInvalid or a bare OSError ("Corrupt snappy compressed data"); the
    OSError subclasses (a file gone, refused, a store out of reach) are not the file's fault: raise them as they are."""
    if not isinstance(e, pa.ArrowException) and type(e) is not OSError:
        raise e
