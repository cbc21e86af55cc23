"""The default job: a byte-level transformer LM on a text corpus, trained on the configured mesh,
checkpointed, resumable, exported."""
from __future__ import annotations

import importlib.metadata
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from omegaconf import OmegaConf

from jaxinfra import checkpoint as ckpt_lib
from jaxinfra import data as data_lib
from jaxinfra import export as export_lib
from jaxinfra import perf
from jaxinfra import sharding as shd
from jaxinfra import train
from jaxinfra.config import DEFAULT_RULES, Config, nm_pattern, to_yaml
from jaxinfra.errors import UserError
from jaxinfra.generate import sample
from jaxinfra.mesh import describe, make_mesh
from jaxinfra.metrics import MetricsWriter
from jaxinfra.model import Transformer, lm_loss, train_flops_per_token
from jaxinfra.optim import make_optimizer
from jaxinfra.pruning import default_include


def check_batch(cfg: Config, divisor: int) -> None:
    """The (micro-)batch must split over the batch mesh axes and the processes."""
    micro = cfg.data.batch_size // cfg.optim.grad_accum
    if divisor % jax.process_count():
        raise UserError(f"the batch mesh axes split the batch {divisor} ways, fewer than (or not a multiple of) "
                        f"the {jax.process_count()} processes: each process must own distinct rows; "
                        f"put data or fsdp across processes")
    for n, what in ((divisor, f"the batch mesh axes ({'x'.join(cfg.mesh.rules.get('batch', [])) or 'none'}) "
                               f"= {divisor}"),
                    (jax.process_count(), f"the {jax.process_count()} processes")):
        if micro % n:
            raise UserError(f"data.batch_size={cfg.data.batch_size} / optim.grad_accum={cfg.optim.grad_accum} "
                            f"= {micro} is not divisible by {what}")


def check_nm(cfg: Config, plan: train.Plan) -> None:
    """N:M groups run along dim 0 of each pruned kernel: it, and each device's shard of it, must divide by M."""
    nm = nm_pattern(cfg.prune.pattern)
    if nm is None:
        return
    flat, _ = jax.tree_util.tree_flatten_with_path(plan.abstract.params)
    for path, a in flat:
        if default_include(path, a):
            local = a.sharding.shard_shape(a.shape)[0]
            if a.shape[0] % nm[1] or local % nm[1]:
                raise UserError(f"prune.pattern={cfg.prune.pattern}: parameter {jax.tree_util.keystr(path)} has "
                                f"input dim {a.shape[0]} ({local} per device), not divisible by M={nm[1]}")


def run_meta(cfg: Config, mesh: Any, step: int) -> dict[str, Any]:
    """What a checkpoint records besides arrays: config, versions, mesh, data position."""
    versions = {}
    for pkg in ("jaxinfra", "jax", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "unknown"
    return {"step": step, "config": OmegaConf.to_container(OmegaConf.structured(cfg)), "versions": versions,
            "mesh": dict(mesh.shape), "processes": jax.process_count(),
            "data": {"global_batches_consumed": step, "batch_size": cfg.data.batch_size,
                     "seq_len": cfg.model.seq_len, "seed": cfg.run.seed}}


def run(cfg: Config) -> dict[str, Any]:
    """Train (or resume), evaluate, checkpoint, export, sample; returns the final figures.

    Raises UserError before compiling the train step.
    """
    t_start = time.perf_counter()
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    corpus = data_lib.load_corpus(cfg.data.path, cfg.data.glob, cfg.data.heldout_percent)
    data_lib.check_sizes(corpus, cfg.model.seq_len, cfg.data.batch_size, cfg.run.eval_batches)
    m = cfg.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor, dcn=m.dcn())
    rules = {k: tuple(v) for k, v in m.rules.items()}
    shd.check_sizes(cfg.model.logical_sizes(), rules, mesh)
    check_batch(cfg, shd.batch_divisor(mesh, rules))
    run_dir = cfg.run.path
    if lead:
        os.makedirs(run_dir, exist_ok=True)
    say(describe(mesh))
    say(f"corpus {corpus.name}: {corpus.n_train_files} train files ({corpus.train.size:,} bytes), "
        f"{corpus.n_heldout_files} held out ({corpus.heldout.size:,} bytes)")

    c = cfg.checkpoint
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    exporter = export_lib.BackgroundExporter(ckpt_dir, os.path.join(run_dir, "exports"), c.export_dtype,
                                             enabled=lead)

    if not cfg.run.peak_flops:  # outside the mesh scope: a one-device matmul
        cfg.run.peak_flops = perf.mesh_peak(mesh, cfg.model.dtype)
    with jax.set_mesh(mesh):
        constrain = shd.LogicalConstraint(mesh, rules)
        model_fn = lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.run.seed), constrain=constrain)
        tx, schedule = make_optimizer(cfg.optim, cfg.run.steps, cfg.prune)
        plan = train.plan_state(model_fn, tx, mesh, rules, allowed_unused=DEFAULT_RULES)
        check_nm(cfg, plan)
        ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=c.keep, keep_every=c.keep_every)
        try:
            return _train(cfg, corpus, mesh, rules, model_fn, tx, schedule, plan, ckpt, exporter, say, t_start)
        finally:
            ckpt.close()  # waits for the last save to be committed
            exporter.drain()


def _train(cfg: Config, corpus: data_lib.Corpus, mesh: Any, rules: dict, model_fn: Any, tx: Any, schedule: Any,
           plan: train.Plan, ckpt: ckpt_lib.Checkpointer, exporter: export_lib.BackgroundExporter, say: Any,
           t_start: float) -> dict[str, Any]:
    """Resume or initialise, compile, train, evaluate, sample (inside the mesh scope)."""
    c, run_dir, lead = cfg.checkpoint, cfg.run.path, jax.process_index() == 0
    if not c.resume and ckpt.steps():
        raise UserError(f"checkpoint.resume=false but {ckpt.directory} holds steps "
                        f"{', '.join(map(str, ckpt.steps()))}: choose another run.dir (or remove them)")
    state = ckpt_lib.resume(ckpt, plan.abstract, restore_step=c.restore_step, fallback=c.fallback,
                            say=say) if c.resume else None
    if state is None:
        state = train.init_state(model_fn, tx, mesh, rules, plan=plan).state
    else:
        saved = ckpt.meta(int(state.step))["data"]
        for key, now in (("batch_size", cfg.data.batch_size), ("seq_len", cfg.model.seq_len),
                         ("seed", cfg.run.seed)):
            if saved[key] != now:
                name = {"batch_size": "data.batch_size", "seq_len": "model.seq_len", "seed": "run.seed"}[key]
                raise UserError(f"checkpoint step {int(state.step)} was trained with {name}={saved[key]}, "
                                f"now {now}: the data position would not carry over "
                                f"(start fresh in another run.dir)")
        say(f"resumed from step {int(state.step)} of {ckpt.directory}")
        dropped = ckpt.delete_after(int(state.step))
        if dropped:
            say(f"removed newer checkpoint steps {', '.join(map(str, dropped))}: training writes them again")
    start = int(state.step)
    flops_per_token = train_flops_per_token(cfg.model)
    say(f"MFU is taken against {cfg.run.peak_flops / 1e9:,.1f} GFLOP/s ({cfg.model.dtype} matmul peak of the "
        f"mesh); the model costs {flops_per_token / 1e6:,.2f} MFLOP per token")
    if lead:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(plan.abstract.params))
    lines, warning = shd.report(plan.abstract.params, plan.logical, plan.shardings.params,
                                plan.abstract.opt_state, plan.shardings.opt_state,
                                meant_to_shard=mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1)
    say(f"model: {n_params:,} parameters; sharding:\n  " + "\n  ".join(lines))
    if warning:
        say(warning)
    if lead:
        with open(os.path.join(run_dir, "sharding.txt"), "w") as f:
            f.write("\n".join(lines + ([warning] if warning else [])) + "\n")

    accum, L, B = cfg.optim.grad_accum, cfg.model.seq_len, cfg.data.batch_size
    leading = 1 if accum > 1 else 0
    batch_sh = NamedSharding(mesh, shd.batch_spec(rules, 2 + leading, leading))
    shape = (accum, B // accum, L + 1) if accum > 1 else (B, L + 1)
    example = {"tokens": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sh)}
    step_fn = train.make_train_step(plan.graphdef, lm_loss, tx, schedule, accum)
    t0 = time.perf_counter()
    compiled = train.compile_train_step(step_fn, plan, {"tokens": batch_sh}, example)
    say(f"train step compiled in {time.perf_counter() - t0:.1f}s")

    loader = data_lib.train_batches(data_lib.Windows(corpus.train, L, "train"), B, cfg.run.seed, start=start)
    batches = data_lib.global_batches(iter(loader), batch_sh, accum)
    eval_sh = NamedSharding(mesh, shd.batch_spec(rules, 2))
    eval_step = train.make_eval_step(plan.graphdef, lm_loss, plan.shardings.params, {"tokens": eval_sh}, mesh)
    eval_set = [data_lib.from_host(b, eval_sh) for b in
                data_lib.eval_windows(corpus.heldout, L, B, cfg.run.eval_batches)] if cfg.run.eval_batches else []
    writer = MetricsWriter(run_dir, cfg.run.steps, initial_step=start, enabled=lead, progress=cfg.run.progress)
    final: dict[str, Any] = {"start_step": start}

    def log(step: int, metrics: dict[str, float]) -> None:
        metrics["mfu"] = flops_per_token * metrics["tokens_per_sec"] / cfg.run.peak_flops
        if step % cfg.run.log_every == 0 or step == cfg.run.steps:
            writer.write(step, metrics)
        writer.progress(step, loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_sec']:,.0f}",
                        mfu=f"{metrics['mfu']:.1%}")
        final.update(loss=metrics["loss"], step=step)

    def evaluate(state: train.TrainState, step: int) -> None:
        if not eval_set:
            return
        loss = float(np.mean([float(eval_step(state.params, b)) for b in eval_set]))
        row = {"eval_loss": loss, "eval_bpb": loss / math.log(2)}
        writer.write(step, row)
        writer.print(f"step {step}: eval loss {loss:.4f}, {row['eval_bpb']:.3f} bits per byte")
        final.update(row)

    def on_step(state: train.TrainState, step: int) -> bool:
        exporter.poll()
        profile.after_dispatch(step, state)
        preempted = ckpt.preempted(step)
        stop = preempted or bool(cfg.run.stop_after and step - start >= cfg.run.stop_after)
        export_now = (c.export_every and step % c.export_every == 0) or (c.export_final and step == cfg.run.steps)
        if stop or export_now or step == cfg.run.steps or (c.every and step % c.every == 0):
            if not bool(all_finite(state.params)):  # never save a diverged state to resume from
                raise train.Diverged(f"parameters became NaN or Inf at step {step}; not checkpointed")
            if exporter.busy:  # this save may rotate out a step still to be exported
                ckpt.wait()
                exporter.drain()
            ckpt.save(step, state, run_meta(cfg, mesh, step))
            if export_now:
                exporter.request(step)
        if stop:
            writer.print(f"stopping at step {step} ({'SIGTERM' if preempted else 'run.stop_after'}); "
                         f"checkpoint saved, a restart resumes from it")
            final["stopped_at"] = step
        return stop

    all_finite = jax.jit(lambda p: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(p)])))
    restore_sigterm = ckpt.watch_sigterm()
    profile = perf.ProfileWindow(os.path.join(run_dir, "profile"), list(cfg.run.profile_steps))
    try:
        state = train.fit(state, compiled, batches, steps=cfg.run.steps, tokens_per_step=B * L,
                          log=log, eval_every=cfg.run.eval_every, evaluate=evaluate, on_step=on_step)
    finally:
        profile.close()
        writer.close()
        restore_sigterm()
    if "stopped_at" in final:
        return final

    if cfg.run.eval_batches and corpus.name == "stdlib" and lead:
        final.update(data_lib.compression_bpb(corpus.heldout))
    if "eval_bpb" in final:
        yard = (f" (zlib -9: {final['zlib_bpb']:.3f}, xz -9e: {final['xz_bpb']:.3f} on all "
                f"{corpus.heldout.size:,} held-out bytes)" if "zlib_bpb" in final else "")
        say(f"final held-out bits per byte: {final['eval_bpb']:.3f}{yard}")
    if cfg.run.sample_tokens and cfg.run.sample_prompts:
        texts = sample(plan.graphdef, state.params, cfg.run.sample_prompts,
                       n_tokens=cfg.run.sample_tokens, seq_len=L, vocab_size=cfg.model.vocab_size,
                       temperature=cfg.run.sample_temperature, seed=cfg.run.seed, mesh=mesh, rules=rules)
        say("samples:")
        for text in texts:
            say("  | " + "\n  | ".join(text.splitlines()[:6]))
    ckpt.wait()
    written, failed = exporter.finish()
    for path in written:
        say(f"exported {path}")
    for line in failed:
        say(f"warning: {line}")
    final["wall_s"] = time.perf_counter() - t_start
    say(f"done in {final['wall_s']:.0f}s; run folder {run_dir}")
    return final
