"""The LM job's tokenizers (data.tokenizer): `bytes` (token i = byte i, no end-of-text token), a
`tokenizer.json` (or a Hugging Face folder holding one: never a Python tokenizer class), or `bpe:N`, a
byte-level BPE of N ids in all trained with the `tokenizers` library on the training split."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError, one_line

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"  # GPT-2's end-of-text token: the separator (and start) of every document
FILE = "tokenizer.json"
# end-of-text names of the families people bring (Llama 3, Llama 2 / Mistral, Qwen, GPT-2), when a folder's
# tokenizer_config.json names none
EOT_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>", "<eos>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of a ByteLevel pre-tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> dict[str, Any]:
    """tokenizer.json of `bytes`: byte i is token i (a BPE with no merges over GPT-2's byte alphabet)."""
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": level, "post_processor": None, "decoder": level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}


def bpe_size(spec: str) -> int:
    """N of `bpe:N` (0 for any other data.tokenizer)."""
    return int(spec[4:]) if spec.startswith("bpe:") and spec[4:].isdigit() else 0


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """Text <-> token ids. `impl` None is `bytes`; `eot` the end-of-text id joining documents (None: joined bare)."""

    name: str
    impl: HFTokenizer | None = None
    eot: int | None = None
    json_text: str = field(default="", repr=False)

    @property
    def vocab_size(self) -> int:
        """Ids in use (the model's vocabulary is this, padded)."""
        return 256 if self.impl is None else self.impl.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A digest of what this tokenizer computes: part of the token cache's key and the run's record."""
        return "bytes" if self.impl is None else "sha256:" + hashlib.sha256(self.json_text.encode()).hexdigest()[:16]

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        """Token ids of each document's bytes (invalid UTF-8 reaches a text tokenizer as U+FFFD)."""
        if self.impl is None:
            return [np.frombuffer(t, np.uint8) for t in texts]
        strings = [t.decode("utf-8", errors="replace") for t in texts]
        return [np.asarray(e.ids, np.int32) for e in self.impl.encode_batch_fast(strings, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt."""
        return [int(i) for i in self.encode_batch([text.encode("utf-8")])[0]]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (special tokens kept, so a sample shows where a document ended)."""
        ids = [int(i) for i in ids]
        if self.impl is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.impl.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for (end-of-text and other special tokens: 0), the per-token weights
        that turn a mean loss per token into bits per byte."""
        if self.impl is None:
            return np.ones(256, np.int32)
        special = {i for i, t in self.impl.get_added_tokens_decoder().items() if t.special}
        if '"ByteLevel"' in json.dumps(json.loads(self.json_text).get("decoder")):
            # a byte-level token is its characters' bytes, one each (decoding a lone piece of a UTF-8
            # sequence one token at a time would count U+FFFD's three)
            byte_of = {c: b for b, c in bytes_to_unicode().items()}
            size = {i: sum(c in byte_of for c in t) for t, i in self.impl.get_vocab(with_added_tokens=True).items()}
        else:  # other decoders (metaspace, byte fallback): each id decoded alone, close but not exact
            pieces = self.impl.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
            size = {i: len(p.encode("utf-8")) for i, p in enumerate(pieces)}
        return np.array([0 if i in special else size.get(i, 0) for i in range(self.vocab_size)], np.int32)

    def files(self, seq_len: int) -> dict[str, str]:
        """tokenizer.json and tokenizer_config.json, as an export carries them (AutoTokenizer loads the folder)."""
        text = self.json_text or json.dumps(byte_tokenizer(), ensure_ascii=False)
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
                                  "clean_up_tokenization_spaces": False}
        if self.eot is not None:
            config["eos_token"] = self.impl.id_to_token(self.eot)
        return {FILE: text, "tokenizer_config.json": json.dumps(config, indent=1, ensure_ascii=False)}


def bytes_tokenizer() -> Tokenizer:
    """`bytes`: 256 ids, no end-of-text token (documents joined bare, as the byte corpus always was)."""
    return Tokenizer("bytes")


def _eot_of(impl: HFTokenizer, config: dict[str, Any]) -> int | None:
    """The end-of-text id: tokenizer_config.json's eos_token, else a special token of a known name."""
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    specials = {t.content: i for i, t in impl.get_added_tokens_decoder().items() if t.special}
    if isinstance(eos, str) and impl.token_to_id(eos) is not None:
        return impl.token_to_id(eos)
    return next((specials[n] for n in EOT_NAMES if n in specials), None)


def from_json(text: str, name: str, config: dict[str, Any] | None = None) -> Tokenizer:
    """A tokenizer from tokenizer.json's text; UserError naming `name` when tokenizers cannot read it."""
    try:
        impl = HFTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises its own Exception subclass with serde's message
        raise UserError(f"data.tokenizer={name}: not a tokenizer.json the tokenizers library reads ({one_line(e)})") \
            from None
    return Tokenizer(name, impl, _eot_of(impl, config or {}), text)


def load(spec: str) -> Tokenizer:
    """`bytes`, or a tokenizer.json file / a folder holding one (local or on a store); bpe:N is trained (train_bpe)."""
    if spec == "bytes":
        return bytes_tokenizer()
    storage.must_exist(spec, "data.tokenizer", "tokenizer.json or folder")
    path, config = spec, {}
    if storage.isdir(spec):
        path = storage.join(spec, FILE)
        if not storage.isfile(path):
            raise UserError(f"data.tokenizer={spec}: the folder holds no {FILE} (only {FILE} is read: a Python "
                            f"tokenizer class is never run)")
        cfg_path = storage.join(spec, "tokenizer_config.json")
        if storage.isfile(cfg_path):
            try:
                config = json.loads(storage.read_text(cfg_path))
            except ValueError as e:
                raise UserError(f"{cfg_path}: not JSON ({one_line(e)})") from None
    return from_json(storage.read_bytes(path).decode("utf-8", errors="replace"), spec, config)


def train_bpe(texts: Iterable[bytes], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of vocab_size ids in all: the end-of-text token (id 0), the 256-byte alphabet, merges.

    Deterministic for the same texts in the same order (the trainer breaks count ties by the pair itself)."""
    impl = HFTokenizer(models.BPE())
    impl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    impl.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    impl.train_from_iterator((t.decode("utf-8", errors="replace") for t in texts), trainer)
    text = impl.to_str()
    return Tokenizer(f"bpe:{vocab_size}", impl, impl.token_to_id(EOT), text)


def run_tokenizer(directory: str, saved_config: dict[str, Any] | None) -> Tokenizer:
    """The tokenizer of the run a step folder (or its checkpoints or run folder) belongs to.

    saved_config is the step's saved config (ckpt.reader.saved_config; None: no record). Its data.tokenizer `bytes`
    (or none: the run predates tokenizers) is `bytes`; any other needs the tokenizer.json the LM job writes into
    the run folder, looked for in `directory` and up to 3 folders above it (step -> checkpoints -> run)."""
    data = (saved_config or {}).get("data")
    spec = None if saved_config is None else str(data.get("tokenizer", "bytes")) if isinstance(data, dict) else "bytes"
    if spec == "bytes":  # a tokenizer.json further up is not this run's
        return bytes_tokenizer()
    found, path = None, storage.absolute(directory)
    for _ in range(4):
        if storage.isfile(storage.join(path, FILE)):
            found = path
            break
        parent = storage.dirname(path)
        if parent == path or storage.is_remote(parent) != storage.is_remote(path):  # at the root (or the bucket)
            break
        path = parent
    if found is None:
        if spec is None:  # no record says otherwise: a byte-level model, as every run before tokenizers
            return bytes_tokenizer()
        raise UserError(f"{directory}: trained with data.tokenizer={spec}, but no {FILE} is in it or the 3 folders "
                        f"above it (the LM job writes it into the run folder: put it back beside checkpoints/)")
    config: Any = {}
    cfg_path = storage.join(found, "tokenizer_config.json")
    if storage.isfile(cfg_path):  # it may name an end-of-text token of the user's own
        try:
            config = json.loads(storage.read_text(cfg_path))
        except ValueError as e:
            raise UserError(f"{cfg_path}: not JSON ({one_line(e)})") from None
    tokenizer = from_json(storage.read_text(storage.join(found, FILE)), storage.join(found, FILE),
                          config if isinstance(config, dict) else {})
    # fewer ids than N is still bpe:N's: the trainer stops early when a small corpus has no more pairs to merge
    if bpe_size(spec or "") and tokenizer.vocab_size > bpe_size(spec or ""):
        raise UserError(f"{storage.join(found, FILE)} holds {tokenizer.vocab_size} ids, but the run trained with "
                        f"data.tokenizer={spec}: not this run's tokenizer")
    return Tokenizer(spec or tokenizer.name, tokenizer.impl, tokenizer.eot, tokenizer.json_text)
