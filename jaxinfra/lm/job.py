"""The default job: a transformer LM on a text corpus (bytes or a tokenizer), a thin user of the generic
trainer (`jaxinfra.train.trainer.train_model`): corpus, model, loss and the LM's end-of-run report."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfra.core.errors import UserError
from jaxinfra.core.log import console
from jaxinfra.data import corpus as corpus_lib
from jaxinfra.data import packing
from jaxinfra.lm import heldout, pretrained, text
from jaxinfra.models.factory import fit_kv_heads, model_fn
from jaxinfra.models.sampling import sample
from jaxinfra.models.transformer import lm_loss, train_flops_per_token
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.sections import Config
from jaxinfra.train.options import Finished, TrainOptions
from jaxinfra.train.trainer import train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LMEval:
    """Held-out loss in nats and bits per byte (one forward pass): the summed loss over ln 2 x the bytes of
    text the targets stand for (`token_bytes` per id; None: one byte a token, the bytes tokenizer)."""

    token_bytes: np.ndarray | None = None

    def __call__(self, model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        loss = lm_loss(model, batch)
        if self.token_bytes is None:
            return {"loss": loss, "bpb": loss / math.log(2)}
        targets_BxL = batch["tokens"][:, 1:]
        n_bytes = jnp.sum(jnp.asarray(self.token_bytes)[targets_BxL])
        return {"loss": loss, "bpb": loss * targets_BxL.size / math.log(2) / jnp.maximum(n_bytes, 1)}


@dataclass(frozen=True)
class EndOfRun:
    """The LM job's report after the last step (train_model's on_finish): held-out bits per byte over every
    held-out byte beside zlib's and xz's, or on the sampled windows, and a few samples."""

    cfg: Config
    corpus: corpus_lib.Corpus
    held: packing.HeldOutWindows | None  # the windows the periodic evaluations sample
    lead: bool

    def __call__(self, done: Finished) -> None:
        cfg, corpus, final = self.cfg, self.corpus, done.final
        # what the forward pass computes with: under QAT the int8-rounded weights, as an export holds them
        params = jax.jit(done.model.forward)(done.state.params) if done.model.forward else done.state.params
        if cfg.run.eval_batches and corpus.name == "stdlib" and self.lead:
            final.update(corpus_lib.compression_bpb(corpus.heldout_text))
        yard = f"zlib -9: {final['zlib_bpb']:.3f}, xz -9e: {final['xz_bpb']:.3f}" if "zlib_bpb" in final else ""
        held = corpus.heldout
        if cfg.run.eval_batches and cfg.run.score_heldout:  # like for like with the compressors: every byte
            final["heldout_bpb"] = heldout.bits_per_byte(
                done.graphdef, params, held.tokens, cfg.model.seq_len, done.mesh, done.rules, n_bytes=held.n_bytes,
                starts=held.starts if cfg.data.packing == "documents" else None)
            log.info(f"final held-out bits per byte over all {held.n_bytes:,} held-out bytes: "
                     f"{final['heldout_bpb']:.3f}" + (f" ({yard} on the same bytes)" if yard else "")
                     + f"; {held.tokens.size:,} tokens of {corpus.tokenizer.name}; the evaluations above sample "
                     f"{len(self.held):,} windows")
        elif "eval_bpb" in final:
            log.info(f"final held-out bits per byte on {len(self.held):,} sampled windows: {final['eval_bpb']:.3f}"
                     + (f" ({yard} on all {held.n_bytes:,} held-out bytes)" if yard else ""))
        if cfg.run.sample_tokens and cfg.run.sample_prompts:
            texts = sample(done.graphdef, params, cfg.run.sample_prompts, n_tokens=cfg.run.sample_tokens,
                           seq_len=cfg.model.seq_len, tokenizer=corpus.tokenizer,
                           temperature=cfg.run.sample_temperature, seed=cfg.run.seed, mesh=done.mesh, rules=done.rules)
            log.info("samples:")
            for text in texts:
                log.info("  | " + "\n  | ".join(text.splitlines()[:6]))


def run(cfg: Config) -> dict[str, Any]:
    """Train (or resume), evaluate, checkpoint, export, sample; returns the final figures.

    Raises UserError before compiling the train step.
    """
    cfg = pretrained.with_folder(cfg)  # checkpoint.init_from=FOLDER: its architecture and tokenizer
    cfg.check_lm()
    lead = jax.process_index() == 0
    console(lead)
    m = cfg.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor, dcn=m.dcn(), stage=m.stage)
    cfg = fit_kv_heads(cfg, mesh)
    m = cfg.mesh
    # the config against the mesh first (a tokenizer.json's vocabulary, 0 until read, is checked once it is)
    shd.check_logical_sizes(cfg.model.logical_sizes(), m.logical_rules, mesh)  # name the config key, not a parameter
    cfg.pipeline.check_mesh(mesh.shape["stage"], cfg.model.n_layers, cfg.data.batch_size // cfg.optim.grad_accum,
                            shd.batch_divisor(mesh, m.logical_rules))
    platform = mesh.devices.flat[0].platform
    if cfg.model.attention == "cudnn" and platform != "gpu":
        raise UserError(f"model.attention=cudnn runs on NVIDIA GPUs only, these devices are {platform}: "
                        f"use model.attention=xla")
    corpus = text.prepare(cfg)  # run.dir checked reachable first
    if lead:
        pretrained.keep_source(cfg)
    cfg = text.with_vocab(cfg, corpus.tokenizer, mesh)
    shd.check_logical_sizes(cfg.model.logical_sizes(), m.logical_rules, mesh)
    train, held = corpus.train, corpus.heldout
    log.info(f"corpus {corpus.name}: {corpus.n_train_docs:,} train documents ({train.n_bytes:,} bytes, "
             f"{train.tokens.size:,} tokens), {corpus.n_heldout_docs:,} held out ({held.n_bytes:,} bytes, "
             f"{held.tokens.size:,} tokens); tokenizer {corpus.tokenizer.name}, {corpus.tokenizer.vocab_size:,} ids")
    L, docs = cfg.model.seq_len, cfg.data.packing == "documents"
    evals = packing.HeldOutWindows(held.tokens, L, cfg.data.eval_batch * cfg.run.eval_batches,
                                   held.starts if docs else None) if cfg.run.eval_batches else None
    build = model_fn(cfg, mesh)
    keys = ("tokens",) + (packing.FIELDS if docs else ())
    options = TrainOptions(mesh=mesh, example_spec={k: ((L + 1,), np.int32) for k in keys},
                           batch_axes={k: ("batch", "seq") for k in keys},
                           eval_fn=LMEval(corpus.tokenizer.token_bytes() if corpus.tokenizer.impl else None),
                           tokens_per_example=L, flops_per_token=train_flops_per_token(cfg.model),
                           compute_dtype=cfg.model.dtype, rounds_inputs=build.rounds_inputs,
                           resume_keys={"seq_len": ("model.seq_len", L),
                                        "tokenizer": ("data.tokenizer", corpus.tokenizer.fingerprint),
                                        "packing": ("data.packing", cfg.data.packing)},
                           on_finish=EndOfRun(cfg, corpus, evals, lead))
    windows = packing.Windows(train.tokens, L, "train", train.starts if docs else None)
    return train_model(cfg, build, lm_loss, windows, evals, options)
