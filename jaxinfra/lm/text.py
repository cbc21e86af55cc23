"""The LM job's text: the run's tokenizer (resumed from its folder, reused from checkpoint.init_from's run,
read from a file, or trained once), its corpus tokenized into the cache, and the model's vocabulary."""
from __future__ import annotations

import dataclasses
import logging
import os

import jax

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.data import cache as cache_lib
from jaxinfra.data import corpus as corpus_lib
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.parallel import sharding as shd
from jaxinfra.settings.sections import Config

log = logging.getLogger(__name__)


def saved_tokenizer(cfg: Config) -> str | None:
    """data.tokenizer of the run being resumed (bytes when its config predates tokenizers); None for a fresh run."""
    root = ckpt_reader.checkpoints_dir(cfg.run.path)
    steps = ckpt_reader.complete_steps(root)  # listed once (a store's listing is a request)
    if not steps:
        return None
    saved = (ckpt_reader.saved_config(storage.join(root, str(steps[-1]))) or {}).get("data") or {}
    return str(saved.get("tokenizer", "bytes"))


def _beside(path: str) -> str | None:
    """tokenizer.json of a run, step folder or export that checkpoint.init_from names (or None)."""
    for _ in range(4):  # an export folder, or up from a step folder / an export file to its run folder
        if storage.isfile(storage.join(path, tok_lib.FILE)):
            return storage.join(path, tok_lib.FILE)
        path = storage.dirname(path.rstrip("/"))
    return None


def _keep(cfg: Config, tokenizer: tok_lib.Tokenizer) -> None:
    """Write the tokenizer into the run folder (exports and generate.py read it there), once: a run folder that
    holds another tokenizer.json is refused (on every process), so a second run on the folder cannot swap it."""
    mine = storage.join(cfg.run.path, tok_lib.FILE)
    if storage.isfile(mine):
        if storage.read_text(mine) != tokenizer.json_text:
            raise UserError(f"run.dir {cfg.run.path} holds a {tok_lib.FILE} of another tokenizer than "
                            f"data.tokenizer={cfg.data.tokenizer}: start in another run.dir")
        return
    if jax.process_index() == 0:  # every process checks (none goes on alone), the first writes
        storage.makedirs(cfg.run.path)
        storage.write_text(mine, tokenizer.json_text)


def _trained(cfg: Config, plan: cache_lib.Plan, size: int) -> tok_lib.Tokenizer:
    """bpe:N, trained by the first process on the training split's sample and written into the run folder;
    the other processes read that file."""
    mine, error = storage.join(cfg.run.path, tok_lib.FILE), None
    if jax.process_index() == 0:
        try:  # the sample reads documents: a bad file is a UserError, which the others must hear of
            tokenizer = tok_lib.train_bpe(corpus_lib.bpe_sample(plan, cfg.data.tokenizer_sample), size)
            _keep(cfg, tokenizer)
            log.info(f"trained {cfg.data.tokenizer} on the training split -> {mine}")
        except UserError as e:
            error = e
    cache_lib.all_or_none(error, "train the tokenizer")  # also the barrier before the others read its file
    if jax.process_index():
        return tok_lib.from_json(storage.read_text(mine), cfg.data.tokenizer)
    return tokenizer


def tokenizer_of(cfg: Config, plan: cache_lib.Plan) -> tok_lib.Tokenizer:
    """The run's tokenizer; UserError when a resumed run was trained with another one."""
    spec = cfg.data.tokenizer
    saved = saved_tokenizer(cfg)
    if saved is not None and saved != spec:
        raise UserError(f"run.dir {cfg.run.path} was trained with data.tokenizer={saved}, now {spec}: resume it with "
                        f"data.tokenizer={saved}, or start fresh in another run.dir")
    size = tok_lib.bpe_size(spec)
    if not size:
        tokenizer = tok_lib.load(spec)
        if tokenizer.impl is not None:
            _keep(cfg, tokenizer)
        return tokenizer
    found = storage.join(cfg.run.path, tok_lib.FILE)
    found = found if storage.isfile(found) else _beside(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else None
    if found is None:
        return _trained(cfg, plan, size)
    tokenizer = tok_lib.from_json(storage.read_text(found), spec)
    if tokenizer.vocab_size > size:
        raise UserError(f"data.tokenizer={spec}: {found} holds {tokenizer.vocab_size} ids, more than {size}")
    log.info(f"tokenizer {spec}: {found}")
    _keep(cfg, tokenizer)
    return tokenizer


def cache_root(cfg: Config) -> str:
    """data.cache, or the run folder's cache/ (a remote run's: beside its local mirror, never uploaded)."""
    if cfg.data.cache:
        return cfg.data.cache
    if storage.is_remote(cfg.run.path):
        return storage.local_mirror(cfg.run.path).rstrip(os.sep) + ".cache"
    return os.path.join(cfg.run.path, "cache")


def with_vocab(cfg: Config, tokenizer: tok_lib.Tokenizer, mesh: jax.sharding.Mesh) -> Config:
    """cfg with model.vocab_size filled from the tokenizer (padded up to a multiple of the mesh axes the vocab is
    split over); UserError when one given is smaller than the tokenizer's."""
    need, given = tokenizer.vocab_size, cfg.model.vocab_size
    if given and given < need:
        raise UserError(f"model.vocab_size={given} is smaller than data.tokenizer={cfg.data.tokenizer}'s "
                        f"{need} ids: set model.vocab_size=0 (the tokenizer's) or at least {need}")
    if given:
        return cfg
    split = shd.ways(mesh, cfg.mesh.logical_rules, "vocab")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=-(-need // split) * split))


def prepare(cfg: Config) -> corpus_lib.Corpus:
    """The tokenizer and the tokenized corpus of cfg.data; UserError for bad files, before anything compiles."""
    storage.reachable(cfg.run.path, "run.dir")  # before its checkpoints are asked for a saved tokenizer
    planned = corpus_lib.plan_of(cfg.data)
    tokenizer = tokenizer_of(cfg, planned[1])
    corpus = corpus_lib.load_corpus(cfg.data, tokenizer, cache_root(cfg), planned)
    corpus_lib.check_corpus(corpus, cfg.model.seq_len, cfg.data.batch_size, cfg.run.eval_batches)
    return corpus
