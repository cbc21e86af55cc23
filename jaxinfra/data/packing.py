"""Windows of a token stream, the LM job's examples: record i is tokens [i*L, i*L + L + 1), documents packed
back to back (concat-then-split: no token is padding, none is dropped). Under data.packing=documents each
window also carries its documents' segment ids and positions restarting at each document, from which the
model builds its attention mask. Records are a pure function of their index, so a resumed run's data is
its step's batch, bit for bit, with no iterator state to checkpoint."""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxinfra.data.sources import fixed_batches

FIELDS = ("segments", "positions")  # what data.packing=documents adds to each example beside "tokens"


def document_fields(starts: np.ndarray, begin: int, n: int) -> dict[str, np.ndarray]:
    """Segment ids (1, 2, ... per document, in order) and positions (0 at each document's first token;
    the window's first document, begun in an earlier window, counts from the window's start) of tokens
    [begin, begin + n), `starts` being each document's first token."""
    at_N = np.arange(begin, begin + n, dtype=np.int64)
    doc_N = np.searchsorted(starts, at_N, side="right") - 1  # -1 before the first document: none in our caches
    first_N = np.maximum(starts[np.maximum(doc_N, 0)], begin) if len(starts) else np.full(n, begin)
    return {"segments": (doc_N - doc_N[0] + 1).astype(np.int32), "positions": (at_N - first_N).astype(np.int32)}


class Windows(grain.sources.RandomAccessDataSource):
    """Record i = tokens [i*seq_len, i*seq_len + seq_len + 1) as int32 (+ segments and positions when
    `starts` is given: data.packing=documents)."""

    def __init__(self, tokens: Any, seq_len: int, name: str, starts: np.ndarray | None = None):
        self.tokens, self.seq_len, self.name, self.starts = tokens, seq_len, name, starts

    def __len__(self) -> int:
        return (self.tokens.size - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(i) * self.seq_len
        return window(self.tokens, self.starts, start, self.seq_len + 1)

    def __repr__(self) -> str:  # grain compares this when restoring an iterator: keep it stable
        return f"Windows({self.name!r}, bytes={self.tokens.size}, seq_len={self.seq_len})"


def window(tokens: Any, starts: np.ndarray | None, start: int, n: int) -> dict[str, np.ndarray]:
    """Tokens [start, start + n) as an example (with its document fields when `starts` is given)."""
    out = {"tokens": np.asarray(tokens[start:start + n]).astype(np.int32)}
    if starts is not None:
        out.update(document_fields(starts, start, n))
    return out


class HeldOutWindows(grain.sources.RandomAccessDataSource):
    """`count` windows of seq_len + 1 tokens spread evenly over the held-out tokens (the fixed eval set)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, count: int, starts: np.ndarray | None = None):
        self.tokens, self.seq_len, self.doc_starts = tokens, seq_len, starts
        self.starts = np.linspace(0, tokens.size - seq_len - 1, count).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return window(self.tokens, self.doc_starts, int(self.starts[i]), self.seq_len + 1)

    def __repr__(self) -> str:
        return f"HeldOutWindows(bytes={self.tokens.size}, seq_len={self.seq_len}, count={len(self.starts)})"


def eval_windows(tokens: np.ndarray, seq_len: int, global_batch: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """Fixed held-out global batches, windows spread evenly over the held-out tokens."""
    return fixed_batches(HeldOutWindows(tokens, seq_len, global_batch * n_batches), global_batch, n_batches)
