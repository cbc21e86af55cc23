"""The default job: a byte-level transformer LM on a text corpus, a thin user of the generic
trainer (`jaxinfra.train.trainer.train_model`): corpus, model, loss and the LM's end-of-run report."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxinfra.core.errors import UserError
from jaxinfra.core.log import console
from jaxinfra.data import corpus as corpus_lib
from jaxinfra.lm import heldout
from jaxinfra.models.factory import model_fn
from jaxinfra.models.sampling import sample
from jaxinfra.models.transformer import lm_loss, train_flops_per_token
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.sections import Config
from jaxinfra.train.options import Finished, TrainOptions
from jaxinfra.train.trainer import train_model

log = logging.getLogger(__name__)


def lm_eval(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Held-out loss in nats and bits per byte (one forward pass)."""
    loss = lm_loss(model, batch)
    return {"loss": loss, "bpb": loss / math.log(2)}


@dataclass(frozen=True)
class EndOfRun:
    """The LM job's report after the last step (train_model's on_finish): held-out bits per byte over every
    held-out byte beside zlib's and xz's, or on the sampled windows, and a few samples."""

    cfg: Config
    corpus: corpus_lib.Corpus
    held: corpus_lib.HeldOutWindows | None  # the windows the periodic evaluations sample
    lead: bool

    def __call__(self, done: Finished) -> None:
        cfg, corpus, final = self.cfg, self.corpus, done.final
        # what the forward pass computes with: under QAT the int8-rounded weights, as an export holds them
        params = jax.jit(done.model.forward)(done.state.params) if done.model.forward else done.state.params
        if cfg.run.eval_batches and corpus.name == "stdlib" and self.lead:
            final.update(corpus_lib.compression_bpb(corpus.heldout))
        yard = f"zlib -9: {final['zlib_bpb']:.3f}, xz -9e: {final['xz_bpb']:.3f}" if "zlib_bpb" in final else ""
        if cfg.run.eval_batches and cfg.run.score_heldout:  # like for like with the compressors: every byte
            final["heldout_bpb"] = heldout.bits_per_byte(done.graphdef, params, corpus.heldout, cfg.model.seq_len,
                                                         done.mesh, done.rules)
            log.info(f"final held-out bits per byte over all {corpus.heldout.size:,} held-out bytes: "
                     f"{final['heldout_bpb']:.3f}" + (f" ({yard} on the same bytes)" if yard else "")
                     + f"; the evaluations above sample {len(self.held):,} windows")
        elif "eval_bpb" in final:
            log.info(f"final held-out bits per byte on {len(self.held):,} sampled windows: {final['eval_bpb']:.3f}"
                     + (f" ({yard} on all {corpus.heldout.size:,} held-out bytes)" if yard else ""))
        if cfg.run.sample_tokens and cfg.run.sample_prompts:
            texts = sample(done.graphdef, params, cfg.run.sample_prompts,
                           n_tokens=cfg.run.sample_tokens, seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                           temperature=cfg.run.sample_temperature, seed=cfg.run.seed, mesh=done.mesh,
                           rules=done.rules)
            log.info("samples:")
            for text in texts:
                log.info("  | " + "\n  | ".join(text.splitlines()[:6]))


def run(cfg: Config) -> dict[str, Any]:
    """Train (or resume), evaluate, checkpoint, export, sample; returns the final figures.

    Raises UserError before compiling the train step.
    """
    cfg.check_lm()
    lead = jax.process_index() == 0
    console(lead)
    corpus = corpus_lib.load_corpus(cfg.data.path, cfg.data.glob, cfg.data.heldout_percent)
    corpus_lib.check_corpus(corpus, cfg.model.seq_len, cfg.data.batch_size, cfg.run.eval_batches)
    m = cfg.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor, dcn=m.dcn(), stage=m.stage)
    shd.check_logical_sizes(cfg.model.logical_sizes(), m.logical_rules, mesh)  # name the config key, not a parameter
    cfg.pipeline.check_mesh(mesh.shape["stage"], cfg.model.n_layers, cfg.data.batch_size // cfg.optim.grad_accum,
                            shd.batch_divisor(mesh, m.logical_rules))
    platform = mesh.devices.flat[0].platform
    if cfg.model.attention == "cudnn" and platform != "gpu":
        raise UserError(f"model.attention=cudnn runs on NVIDIA GPUs only, these devices are {platform}: "
                        f"use model.attention=xla")
    log.info(f"corpus {corpus.name}: {corpus.n_train_files} train files ({corpus.train.size:,} bytes), "
             f"{corpus.n_heldout_files} held out ({corpus.heldout.size:,} bytes)")
    L = cfg.model.seq_len
    held = corpus_lib.HeldOutWindows(corpus.heldout, L, cfg.data.eval_batch * cfg.run.eval_batches) \
        if cfg.run.eval_batches else None
    build = model_fn(cfg, mesh)
    options = TrainOptions(mesh=mesh, example_spec={"tokens": ((L + 1,), np.int32)},
                           batch_axes={"tokens": ("batch", "seq")}, eval_fn=lm_eval, tokens_per_example=L,
                           flops_per_token=train_flops_per_token(cfg.model), compute_dtype=cfg.model.dtype,
                           rounds_inputs=build.rounds_inputs, resume_keys={"seq_len": ("model.seq_len", L)},
                           on_finish=EndOfRun(cfg, corpus, held, lead))
    return train_model(cfg, build, lm_loss, corpus_lib.Windows(corpus.train, L, "train"), held, options)
