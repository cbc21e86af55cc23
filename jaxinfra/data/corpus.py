"""The LM job's corpus: documents (documents.py: the Python standard library by default, a file, a folder,
or s3:// and gs:// prefixes; text files, JSONL, Parquet), split into training and held-out documents by a
hash, tokenized once into the token cache (cache.py); and what zlib and xz make of the held-out bytes, the
figures a model has to beat."""
from __future__ import annotations

import hashlib
import logging
import lzma
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from jaxinfra.core.errors import UserError
from jaxinfra.data import cache as cache_lib
from jaxinfra.data.documents import list_files
from jaxinfra.data.tokenizer import Tokenizer
from jaxinfra.settings.sections import DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """A tokenized corpus: its training and held-out token streams, read from the cache."""

    name: str
    tokenizer: Tokenizer
    train: cache_lib.Split
    heldout: cache_lib.Split
    heldout_text: bytes  # the held-out documents' bytes (what the compressors' yardsticks read)
    folder: str  # its cache folder

    @property
    def n_train_docs(self) -> int:
        """Training documents."""
        return len(self.train.starts)

    @property
    def n_heldout_docs(self) -> int:
        """Held-out documents."""
        return len(self.heldout.starts)


def plan_of(data: DataConfig) -> tuple[str, cache_lib.Plan]:
    """(corpus name, what to tokenize) of the data section; UserError for a missing or empty path."""
    name, files = list_files(data.path, data.glob)
    held = list_files(data.heldout_path, data.glob)[1] if data.heldout_path else []
    return name, cache_lib.Plan(tuple(files), tuple(held), data.heldout_percent, data.text_key)


def bpe_sample(plan: cache_lib.Plan, limit: int) -> Iterator[bytes]:
    """At most `limit` bytes (0: all) of training documents, chosen by a hash of each document's key (the
    same files give the same sample); when the hash picks nothing (one big document), the first `limit` bytes."""
    total = sum(f.size for f in plan.files)
    fraction = 1.0 if not limit or limit >= total else limit / total
    picked = lambda key: int.from_bytes(hashlib.sha256(b"sample:" + key.encode()).digest()[:8], "little") % 10_000 \
        < fraction * 10_000
    taken = 0
    for by_hash in (True, False):
        for key, held, raw in cache_lib.split_documents(plan, plan.files):
            if held or (by_hash and not picked(key)):
                continue
            raw = raw[:limit - taken] if limit else raw
            taken += len(raw)
            yield raw
            if limit and taken >= limit:
                return
        if taken:
            return


def load_corpus(data: DataConfig, tokenizer: Tokenizer, cache_root: str,
                planned: tuple[str, cache_lib.Plan] | None = None) -> Corpus:
    """The corpus tokenized by `tokenizer` (its cache under cache_root: reused, or written once)."""
    name, plan = planned or plan_of(data)
    found = cache_lib.build(plan, tokenizer, cache_root)
    if found.train.tokens.size == 0:
        raise UserError(f"data.path={data.path or name}: the corpus is empty ({len(plan.files)} files, no text "
                        f"outside the held-out documents)")
    return Corpus(name, tokenizer, found.train, found.heldout, found.heldout_text, found.folder)


def check_corpus(corpus: Corpus, seq_len: int, batch_size: int, eval_batches: int) -> None:
    """The corpus must hold at least one global batch of windows (and one held-out window)."""
    need, n = seq_len + 1, corpus.train.tokens.size
    if n // seq_len < batch_size or n < need:
        raise UserError(f"data: the training corpus has {n} tokens, fewer than data.batch_size={batch_size} "
                        f"windows of model.seq_len={seq_len}")
    if eval_batches and corpus.heldout.tokens.size < need:
        raise UserError(f"data: the held-out split has {corpus.heldout.tokens.size} tokens "
                        f"({corpus.n_heldout_docs} documents), fewer than one window of model.seq_len+1={need}; "
                        f"raise data.heldout_percent, give data.heldout_path or set run.eval_batches=0")


def compression_bpb(data: bytes | np.ndarray) -> dict[str, float]:
    """Bits per byte that zlib -9 and xz -9e reach on the same bytes: the yardsticks."""
    raw = bytes(data)
    if not raw:
        return {}
    return {"zlib_bpb": 8 * len(zlib.compress(raw, 9)) / len(raw),
            "xz_bpb": 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / len(raw)}
