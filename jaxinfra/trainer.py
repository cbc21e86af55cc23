"""The generic trainer: any Flax NNX model, loss and random-access data source, trained on the
configured mesh with born-sharded state, one compiled step, checkpoints, resume and exports.

`train_model` knows nothing of language models; `jaxinfra.job` (the default byte-level LM) is one
user of it, a classifier in examples/ another. Every check of the user's inputs (logical axes the
rules do not map, a non-scalar loss, examples of the wrong shape or dtype) raises UserError, a
ValueError, before the train step compiles.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from omegaconf import OmegaConf

from jaxinfra import checkpoint as ckpt_lib
from jaxinfra import data as data_lib
from jaxinfra import export as export_lib
from jaxinfra import perf
from jaxinfra import sharding as shd
from jaxinfra import train
from jaxinfra.config import DEFAULT_RULES, Config, nm_pattern, prune_warnings, to_yaml
from jaxinfra.errors import UserError
from jaxinfra.mesh import describe, make_mesh
from jaxinfra.metrics import MetricsWriter
from jaxinfra.optim import make_optimizer
from jaxinfra.pruning import PruneState, layer_sparsity, make_include, path_str

EvalFn = Callable[[nnx.Module, Any], Mapping[str, jax.Array]]


class Finished(NamedTuple):
    """What `on_finish` receives after the last step (inside the mesh scope)."""

    graphdef: nnx.GraphDef
    state: train.TrainState
    mesh: Mesh
    rules: dict[str, tuple[str, ...]]
    final: dict[str, Any]  # the figures train_model returns; on_finish may add to them


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
    include = make_include(list(cfg.prune.params), plan.logical)  # the tensors prune.params selects
    flat, _ = jax.tree_util.tree_flatten_with_path(plan.abstract.params)
    for path, a in flat:
        if include(path, a):
            local = a.sharding.shard_shape(a.shape)[0]
            if a.shape[0] % nm[1] or local % nm[1]:
                raise UserError(f"prune.pattern={cfg.prune.pattern}: parameter {jax.tree_util.keystr(path)} has "
                                f"input dim {a.shape[0]} ({local} per device), not divisible by M={nm[1]}")


def check_logical(logical: Any, rules: Mapping[str, Any]) -> None:
    """Every logical axis a parameter names needs a rule: name the parameter and the axis."""
    flat, _ = jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for path, spec in flat:
        for entry in spec:
            for name in entry if isinstance(entry, tuple) else (entry,):
                if name is not None and name not in rules:
                    raise UserError(
                        f"model_fn: parameter {jax.tree_util.keystr(path, simple=True, separator='/')} names logical "
                        f"axis {name!r}, which mesh.rules does not map (mapped: {', '.join(sorted(rules))}); "
                        f"add mesh.rules.{name}=[...] (mesh axes, or [] to replicate)")


def _scalar_check(fn: Callable, graphdef: nnx.GraphDef, params: Any, batch: Any, what: str) -> Any:
    """Trace fn(model, batch) abstractly: its output must be a scalar (loss_fn) or a dict of them (eval_fn)."""
    out = jax.eval_shape(lambda p, b: fn(nnx.merge(graphdef, p), b), params, batch)
    leaves = out.items() if isinstance(out, Mapping) else [(None, out)]
    for key, leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape != ():
            label = f"{what}[{key!r}]" if key is not None else what
            raise UserError(f"{label} returned shape {shape}, expected a scalar")
    return out


def run_meta(cfg: Config, mesh: Mesh, step: int, data: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records besides arrays: config, versions, mesh, data position."""
    versions = {}
    for pkg in ("jaxinfra", "jax", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "unknown"
    return {"step": step, "config": OmegaConf.to_container(OmegaConf.structured(cfg)), "versions": versions,
            "mesh": dict(mesh.shape), "processes": jax.process_count(),
            "data": {"global_batches_consumed": step, **data}}


def train_model(cfg: Config, model_fn: train.ModelFn, loss_fn: train.LossFn, train_source: data_lib.Source,
                eval_source: data_lib.Source | None = None, *, mesh: Mesh | None = None,
                example_spec: Mapping[str, tuple[Sequence[int], Any]] | None = None,
                batch_axes: Mapping[str, Sequence[str | None]] | None = None, eval_fn: EvalFn | None = None,
                optimizer: tuple[optax.GradientTransformation, optax.Schedule | None] | None = None,
                tokens_per_example: int = 1, flops_per_token: float = 0.0,
                resume_keys: Mapping[str, tuple[str, Any]] | None = None,
                on_finish: Callable[[Finished], None] | None = None) -> dict[str, Any]:
    """Train any NNX model on cfg's mesh: init or resume, compile, fit, evaluate, checkpoint, export.

    model_fn() builds the model (parameters annotated with logical axis names that cfg.mesh.rules
    maps); loss_fn(model, batch) returns a scalar; train_source / eval_source are random-access
    sources (len, [i]) of examples, dicts of numpy arrays, batched to cfg.data.batch_size.
    example_spec: {key: (shape, dtype)} every example must match (default: the first example's).
    batch_axes: logical names of each batch entry's dimensions (default: ("batch", None, ...)).
    eval_fn(model, batch) -> dict of scalars averaged over the eval batches (default: {"loss": loss}).
    optimizer: (tx, schedule) instead of the one built from cfg.optim and cfg.prune.
    tokens_per_example and flops_per_token give tokens_per_sec and MFU (logged when flops are known).
    resume_keys: {meta key: (config name, value)} a resumed run must keep (batch size and seed always).
    Returns the final figures (loss, step, eval_*, ...) and "model", the trained module.
    Raises UserError (a ValueError) for bad input before compiling the train step.
    """
    t_start = time.perf_counter()
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    data_lib.check_source(train_source, "train_source")
    first = data_lib.spec_of(train_source[0], "train_source example 0")
    if example_spec is not None:
        spec = {str(k): (tuple(s), np.dtype(d)) for k, (s, d) in example_spec.items()}
        data_lib.check_example(train_source[0], spec, "train_source", 0, "as example_spec declares")
    else:
        spec = first
    B, accum = cfg.data.batch_size, cfg.optim.grad_accum
    eval_host = data_lib.fixed_batches(eval_source, B, cfg.run.eval_batches, "eval_source", spec) \
        if eval_source is not None and cfg.run.eval_batches else []
    m = cfg.mesh
    mesh = mesh if mesh is not None else make_mesh(m.data, m.fsdp, m.tensor, dcn=m.dcn())
    rules = {k: tuple(v) for k, v in m.rules.items()}
    check_batch(cfg, shd.batch_divisor(mesh, rules))
    names = {}
    for key, (shape, _) in spec.items():
        names[key] = tuple((batch_axes or {}).get(key, ("batch",) + (None,) * len(shape)))
        if len(names[key]) != len(shape) + 1:
            raise UserError(f"batch_axes[{key!r}]={names[key]} names {len(names[key])} dims, but a batch of "
                            f"{key!r} has {len(shape) + 1} (batch, then {shape})")
    run_dir = cfg.run.path
    if lead:
        os.makedirs(run_dir, exist_ok=True)
    say(describe(mesh))
    c = cfg.checkpoint
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    exporter = export_lib.BackgroundExporter(ckpt_dir, os.path.join(run_dir, "exports"), c.export_dtype,
                                             enabled=lead)
    if flops_per_token and not cfg.run.peak_flops:  # outside the mesh scope: a one-device matmul
        cfg.run.peak_flops = perf.mesh_peak(mesh, cfg.model.dtype)
    with jax.set_mesh(mesh):
        _, _, logical = train.abstract_model(model_fn)  # checked here to name the parameter
        check_logical(logical, rules)
        tx, schedule = optimizer if optimizer is not None else make_optimizer(cfg.optim, cfg.run.steps, cfg.prune,
                                                                                   logical=logical)
        plan = train.plan_state(model_fn, tx, mesh, rules, allowed_unused=list(DEFAULT_RULES))
        check_nm(cfg, plan)
        lead_names = (None,) if accum > 1 else ()
        batch_sh = {k: NamedSharding(mesh, shd.logical_to_spec(lead_names + n, rules)) for k, n in names.items()}
        eval_sh = {k: NamedSharding(mesh, shd.logical_to_spec(n, rules)) for k, n in names.items()}
        lead_shape = (accum, B // accum) if accum > 1 else (B,)
        canon = lambda d: jax.dtypes.canonicalize_dtype(d)
        example = {k: jax.ShapeDtypeStruct(lead_shape + s, canon(d), sharding=batch_sh[k]) for k, (s, d) in spec.items()}
        micro = {k: jax.ShapeDtypeStruct((B // accum,) + s, canon(d), sharding=eval_sh[k]) for k, (s, d) in spec.items()}
        _scalar_check(loss_fn, plan.graphdef, plan.abstract.params, micro, "loss_fn")
        eval_fn = eval_fn or (lambda model, batch: {"loss": loss_fn(model, batch)})
        if eval_host:
            _scalar_check(eval_fn, plan.graphdef, plan.abstract.params, micro, "eval_fn")
        data_meta = {"batch_size": B, "seed": cfg.run.seed,
                     "example": {k: [list(s), str(np.dtype(d))] for k, (s, d) in spec.items()},
                     **{k: v for k, (_, v) in (resume_keys or {}).items()}}
        ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=c.keep, keep_every=c.keep_every)
        setup = _Setup(cfg, mesh, rules, model_fn, loss_fn, eval_fn, train_source, tx, schedule, plan, ckpt, exporter, say,
                       t_start, batch_sh, eval_sh, example, spec, eval_host, tokens_per_example, flops_per_token,
                       data_meta, dict(resume_keys or {}), on_finish)
        try:
            return _train(setup)
        finally:
            ckpt.close()  # waits for the last save to be committed
            exporter.drain()


class _Setup(NamedTuple):
    """Everything checked and planned before compiling, handed to the loop."""

    cfg: Config
    mesh: Mesh
    rules: dict
    model_fn: train.ModelFn
    loss_fn: train.LossFn
    eval_fn: EvalFn
    train_source: Any
    tx: optax.GradientTransformation
    schedule: Any
    plan: train.Plan
    ckpt: ckpt_lib.Checkpointer
    exporter: export_lib.BackgroundExporter
    say: Callable[..., None]
    t_start: float
    batch_sh: dict
    eval_sh: dict
    example: dict
    spec: dict
    eval_host: list
    tokens_per_example: int
    flops_per_token: float
    data_meta: dict
    resume_keys: dict
    on_finish: Callable[[Finished], None] | None


def _resume_or_init(s: _Setup) -> train.TrainState:
    """The newest checkpoint (its data position checked against this run) or a fresh born-sharded state."""
    c, ckpt, say = s.cfg.checkpoint, s.ckpt, s.say
    if not c.resume and ckpt.steps():
        raise UserError(f"checkpoint.resume=false but {ckpt.directory} holds steps "
                        f"{', '.join(map(str, ckpt.steps()))}: choose another run.dir (or remove them)")
    state = ckpt_lib.resume(ckpt, s.plan.abstract, restore_step=c.restore_step, fallback=c.fallback,
                            say=say) if c.resume else None
    if state is None:
        return train.init_state(s.model_fn, s.tx, s.mesh, s.rules, plan=s.plan).state
    saved = ckpt.meta(int(state.step))["data"]
    keys = {"batch_size": "data.batch_size", "seed": "run.seed", "example": "the data source's example shapes",
            **{k: name for k, (name, _) in s.resume_keys.items()}}
    for key, name in keys.items():
        if key in saved and saved[key] != s.data_meta[key]:
            raise UserError(f"checkpoint step {int(state.step)} was trained with {name}={saved[key]}, "
                            f"now {s.data_meta[key]}: the data position would not carry over "
                            f"(start fresh in another run.dir)")
    say(f"resumed from step {int(state.step)} of {ckpt.directory}")
    dropped = ckpt.delete_after(int(state.step))
    if dropped:
        say(f"removed newer checkpoint steps {', '.join(map(str, dropped))}: training writes them again")
    return state


def _train(s: _Setup) -> dict[str, Any]:
    """Resume or initialise, report, compile, train, evaluate, finish (inside the mesh scope)."""
    cfg, mesh, plan, ckpt, exporter, say = s.cfg, s.mesh, s.plan, s.ckpt, s.exporter, s.say
    c, run_dir, lead = cfg.checkpoint, cfg.run.path, jax.process_index() == 0
    state = _resume_or_init(s)
    start = int(state.step)
    if s.flops_per_token:
        say(f"MFU is taken against {cfg.run.peak_flops / 1e9:,.1f} GFLOP/s ({cfg.model.dtype} matmul peak of the "
            f"mesh); the model costs {s.flops_per_token / 1e6:,.2f} MFLOP per token")
    if lead:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    for line in prune_warnings(cfg):
        say(line)
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

    B, accum = cfg.data.batch_size, cfg.optim.grad_accum
    step_fn = train.make_train_step(plan.graphdef, s.loss_fn, s.tx, s.schedule, accum)
    t0 = time.perf_counter()
    compiled = train.compile_train_step(step_fn, plan, s.batch_sh, s.example)
    say(f"train step compiled in {time.perf_counter() - t0:.1f}s")
    loader = data_lib.train_batches(s.train_source, B, cfg.run.seed, start=start, spec=s.spec)
    batches = data_lib.global_batches(iter(loader), s.batch_sh, accum)
    eval_step = train.make_eval_step(plan.graphdef, s.eval_fn, plan.shardings.params, s.eval_sh, mesh)
    eval_set = [data_lib.from_host(b, s.eval_sh) for b in s.eval_host]
    writer = MetricsWriter(run_dir, cfg.run.steps, initial_step=start, enabled=lead, progress=cfg.run.progress)
    final: dict[str, Any] = {"start_step": start}
    unit = "tok_s" if s.tokens_per_example > 1 else "ex_s"

    def log(step: int, metrics: dict[str, float]) -> None:
        metrics["examples_per_sec"] = metrics["tokens_per_sec"] / s.tokens_per_example
        if s.flops_per_token and cfg.run.peak_flops:
            metrics["mfu"] = s.flops_per_token * metrics["tokens_per_sec"] / cfg.run.peak_flops
        if step % cfg.run.log_every == 0 or step == cfg.run.steps:
            writer.write(step, metrics)
        shown = {"loss": f"{metrics['loss']:.3f}", unit: f"{metrics['tokens_per_sec']:,.0f}"}
        if "mfu" in metrics:
            shown["mfu"] = f"{metrics['mfu']:.1%}"
        writer.progress(step, **shown)
        final.update(loss=metrics["loss"], step=step)

    def evaluate(state: train.TrainState, step: int) -> None:
        if not eval_set:
            return
        outs = [jax.device_get(eval_step(state.params, b)) for b in eval_set]
        keys = sorted(outs[0], key=lambda k: (k != "loss", k))  # loss first
        row = {f"eval_{k}": float(np.mean([float(o[k]) for o in outs])) for k in keys}
        writer.write(step, row)
        writer.print(f"step {step}: eval " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in row.items()))
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
            ckpt.save(step, state, run_meta(cfg, mesh, step, s.data_meta))
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
        state = train.fit(state, compiled, batches, steps=cfg.run.steps, tokens_per_step=B * s.tokens_per_example,
                          log=log, eval_every=cfg.run.eval_every, evaluate=evaluate, on_step=on_step)
    finally:
        profile.close()
        writer.close()
        restore_sigterm()
    final["model"] = nnx.merge(plan.graphdef, state.params)
    if lead and cfg.run.plot:
        _plot(run_dir, say)
    if "stopped_at" in final:
        return final
    if isinstance(state.opt_state, PruneState):
        lines = _sparsity_table(state)
        say("sparsity per pruned tensor:\n  " + "\n  ".join(lines))
        if lead:
            with open(os.path.join(run_dir, "sparsity.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
    if s.on_finish is not None:
        s.on_finish(Finished(plan.graphdef, state, mesh, s.rules, final))
    ckpt.wait()
    written, failed = exporter.finish()
    for path in written:
        say(f"exported {path}")
    for line in failed:
        say(f"warning: {line}")
    final["wall_s"] = time.perf_counter() - s.t_start
    say(f"done in {final['wall_s']:.0f}s; run folder {run_dir}")
    return final


def _sparsity_table(state: train.TrainState) -> list[str]:
    """One row per pruned tensor: its path, zeros counted in the parameters, and the mask's fraction."""
    fractions = jax.device_get(jax.jit(layer_sparsity)(state.opt_state.masks))
    zeros = jax.device_get(jax.jit(lambda p: jax.tree.map(lambda x: jnp.sum(x == 0), p))(state.params))
    flat = {f"sparsity/{path_str(path)}": (int(z), x.size)
            for (path, z), x in zip(jax.tree_util.tree_flatten_with_path(zeros)[0], jax.tree.leaves(state.params))}
    rows = [f"{'tensor':32s} {'zeros':>10s} {'of':>10s} {'sparsity':>8s}"]
    total = [0, 0]
    for key, frac in fractions.items():
        z, n = flat[key]
        total[0], total[1] = total[0] + z, total[1] + n
        rows.append(f"{key[len('sparsity/'):]:32s} {z:10,d} {n:10,d} {float(frac):8.2%}")
    rows.append(f"{'all pruned tensors':32s} {total[0]:10,d} {total[1]:10,d} {total[0] / max(total[1], 1):8.2%}")
    return rows


def _plot(run_dir: str, say: Callable[..., None]) -> None:
    """plots.png in the run folder; a failure to plot never fails the run."""
    from jaxinfra.plots import plot_run  # matplotlib only when plotting
    try:
        say(f"plots: {plot_run(run_dir)}")
    except Exception as e:  # noqa: BLE001 (a plot is a convenience: report and carry on)
        say(f"warning: no plots ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
