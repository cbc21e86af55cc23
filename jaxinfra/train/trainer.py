"""The generic trainer: any Flax NNX model, loss and random-access data source, trained on the
configured mesh with born-sharded state, one compiled step, checkpoints, resume and exports.

`train_model` knows nothing of language models; `jaxinfra.lm.job` (the default byte-level LM) is one
user of it, a classifier in examples/ another. Every check of the user's inputs (logical axes the
rules do not map, a non-scalar loss, examples of the wrong shape or dtype) raises UserError, a
ValueError, before the train step compiles. The loop (`_train`, `fit`) asks each component in turn
whether it is due: the Reporter (metrics), the Evaluator, the profiler window and the Saver.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from jaxinfra.ckpt import lock as lock_lib
from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.compress import roles
from jaxinfra.compress.pruning import find_prune_state
from jaxinfra.core import storage
from jaxinfra.core.errors import Failed, UserError, naming
from jaxinfra.core.log import console
from jaxinfra.core.names import layer_names, lead_of, path_str
from jaxinfra.core.state import TrainState
from jaxinfra.data import sources as data_lib
from jaxinfra.hub.hf import check_model
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import describe, make_mesh
from jaxinfra.settings.loading import to_yaml
from jaxinfra.settings.sections import DEFAULT_RULES, Config
from jaxinfra.train import compression, evaluation, perf, warmstart
from jaxinfra.train.checks import check_batch, check_eval_fn, check_logical, check_loss_fn, example_fields
from jaxinfra.train.evaluation import EvalFn, Evaluator, loss_eval, mean_eval
from jaxinfra.train.metrics import METRICS, MetricsWriter, Reporter
from jaxinfra.train.mirror import Mirror
from jaxinfra.train.optim import make_optimizer, schedule_change, with_pruning
from jaxinfra.train.options import Finished, TrainOptions
from jaxinfra.train.saver import Saver
from jaxinfra.train.step import (
    LossFn,
    ModelDef,
    ModelFn,
    StepPlan,
    abstract_model,
    example_batch,
    make_eval_step,
    plan_step,
)

log = logging.getLogger(__name__)


def fit(state: TrainState, compiled: Callable, batches: Iterator[Any], *, steps: int, reporter: Reporter,
        evaluator: Evaluator | None = None, profile: perf.ProfileWindow | None = None,
        saver: Saver | None = None) -> TrainState:
    """Steps from state.step to `steps`: dispatch step N, then the reporter fetches step N-1's metrics,
    so the device never waits on the host; every hook runs outside the compiled step."""
    for step in range(int(jax.device_get(state.step)) + 1, steps + 1):
        state, metrics = compiled(state, next(batches))  # reading the next batch overlaps this step
        reporter.dispatched(step, metrics)
        if evaluator is not None and evaluator.due(step):
            reporter.evaluated(step, evaluator.run(state))
        if profile is not None:
            profile.after_dispatch(step, state)
        if saver is not None and saver.maybe_save(step, state, last=step == steps):
            break
    reporter.flush()
    return state


def train_model(cfg: Config, model_fn: ModelFn, loss_fn: LossFn, train_source: data_lib.Source,
                eval_source: data_lib.Source | None = None, options: TrainOptions = TrainOptions()) -> dict[str, Any]:
    """Train any NNX model on cfg's mesh: init or resume, compile, fit, evaluate, checkpoint, export.

    model_fn() builds the model (parameters annotated with logical axis names that cfg.mesh.rules
    maps; any other nnx.Variable, e.g. BatchNorm statistics, is carried and checkpointed; nnx.Dropout's
    RNG streams are reseeded from (run.seed, step) every step); loss_fn(model, batch) returns a scalar
    or (scalar, {name: scalar}) whose metrics are logged beside it; train_source / eval_source are random-access
    sources (len, [i]) of examples, dicts of numpy arrays, batched to cfg.data.batch_size; `options`
    (TrainOptions) the rest. Returns the final figures (loss, step, eval_*, ...) and "model", the trained
    module (eval mode). Raises UserError (a ValueError) for bad input before compiling the train step.
    """
    t_start = time.perf_counter()
    o = options
    cfg.check_train()
    storage.reachable(cfg.run.path, "run.dir")
    lead = jax.process_index() == 0
    console(lead)
    data_lib.check_source(train_source, "train_source")
    first = data_lib.spec_of(train_source[0], "train_source example 0")
    if o.example_spec is not None:
        spec = {str(k): (tuple(s), np.dtype(d)) for k, (s, d) in o.example_spec.items()}
        data_lib.check_example(train_source[0], spec, "train_source", 0, "as example_spec declares")
    else:
        spec = first
    B = cfg.data.batch_size
    eval_host = data_lib.fixed_batches(eval_source, cfg.data.eval_batch, cfg.run.eval_batches, "eval_source", spec) \
        if eval_source is not None and cfg.run.eval_batches else []
    m, rules = cfg.mesh, cfg.mesh.logical_rules
    mesh = o.mesh if o.mesh is not None else make_mesh(m.data, m.fsdp, m.tensor, dcn=m.dcn(), stage=m.stage)
    check_batch(cfg, shd.batch_divisor(mesh, rules))
    fields = example_fields(spec, o.batch_axes)
    # outside the mesh scope: a one-device matmul
    peak = cfg.run.peak_flops or (perf.mesh_peak(mesh, o.compute_dtype) if o.flops_per_token else 0.0)
    with contextlib.ExitStack() as scope:
        scope.enter_context(lock_lib.held(cfg.run.path, lead=lead))  # before anything is written there
        mirror = _mirror(cfg, lead)
        scope.callback(mirror.push)  # what the run wrote reaches the store, also after a failure
        scope.enter_context(jax.set_mesh(mesh))
        log.info(describe(mesh))
        model = abstract_model(model_fn)
        if mesh.shape.get("stage", 1) > 1 and not model.stacked:
            raise UserError(f"mesh.stage={mesh.shape['stage']}: the model has no jaxinfra.Stacked block to split into "
                            f"stages; build its repeated block with Stacked(make_block, n_layers) (docs/strategies.md) "
                            f"or set mesh.stage=1")
        check_logical(model.logical, rules)  # checked here to name the parameter
        check_logical(model.state_logical, rules, "variable")
        micro = example_batch(fields, B // cfg.optim.grad_accum)
        check_loss_fn(loss_fn, model, micro)
        if cfg.checkpoint.export_format == "hf":
            check_model(model.params, model.stacked)
        eval_fn = o.eval_fn or loss_eval(loss_fn)
        if eval_host:
            check_eval_fn(eval_fn, model, micro)
        found = compression.model_roles(model, loss_fn, micro)  # pruning, quantization and int8 exports read them
        kernels = compression.kernels_record(found, o.compute_dtype)
        if cfg.quant.activations != "none" and not o.rounds_inputs:
            raise UserError(f"quant.activations={cfg.quant.activations}: the model rounds its own matmul inputs, "
                            f"and only the default Transformer does (TrainOptions(rounds_inputs=True)); a model of "
                            f"your own trains with quant.weights=int8 alone")
        if cfg.quant.enabled:  # the same float parameters; the forward pass rounds them to int8
            model, kernels["quantized"] = compression.quantized_model(cfg.quant, model, found, o.compute_dtype)
        selection = compression.pruning_selection(cfg.prune, model, loss_fn, micro, found) if cfg.prune.enabled \
            else None
        tx, schedule = _optimizer(cfg, o.optimizer, model, selection)
        plan = plan_step(model_fn, loss_fn, tx, mesh, rules, fields, accum=cfg.optim.grad_accum, batch_size=B,
                         schedule=schedule, allowed_unused=list(DEFAULT_RULES), seed=cfg.run.seed, model=model)
        roles.check_nm(cfg.prune, plan.abstract.params, selection)
        data_meta = {"batch_size": B, "seed": cfg.run.seed,
                     "example": {k: [list(s), str(np.dtype(d))] for k, (s, d) in spec.items()},
                     **{k: v for k, (_, v) in (o.resume_keys or {}).items()}}
        names = {"batch_size": "data.batch_size", "seed": "run.seed", "example": "the data source's example shapes",
                 **{k: name for k, (name, _) in (o.resume_keys or {}).items()}}
        recorded = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, peak_flops=peak))  # the caller's stays
        writer = MetricsWriter(cfg.run.logs, cfg.run.steps, enabled=lead, progress=cfg.run.progress)
        saver = Saver(cfg.run.path, cfg.checkpoint, stop_after=cfg.run.stop_after,
                      record=functools.partial(ckpt_lib.record, recorded, mesh, data=data_meta, kernels=kernels,
                                               stacked=model.stacked),
                      lead=lead, on_save=(writer.flush, mirror.push))  # the logs reach the store with each step
        scope.callback(saver.close)  # waits for the last save to be committed, also after a failure
        scope.callback(saver.watch_sigterm())  # from here on (compiling too) SIGTERM saves and stops
        restored = saver.restore(plan.abstract, data_meta, names, plan.model.stacked)
        state = _start(cfg, plan, saver, restored, known=o.optimizer is None)
        run = _Run(cfg=recorded, plan=plan, saver=saver, writer=writer, options=o, eval_fn=eval_fn, lead=lead,
                   t_start=t_start, eval_examples=len(eval_source) if eval_source is not None else 0)
        return _train(run, state, train_source, spec, eval_host)


def _start(cfg: Config, plan: StepPlan, saver: Saver, restored: TrainState | None, *, known: bool) -> TrainState:
    """The first state: the run's own resumed step (saying what a changed run.steps does to the
    schedule), else the model of checkpoint.init_from with a fresh optimizer, else a fresh init."""
    if restored is not None:
        step = int(restored.step)
        line = schedule_change(cfg.optim, saver.saved_steps(), cfg.run.steps, step, known=known)
        if line:
            log.info(line)
        if cfg.checkpoint.init_from:
            log.info(f"checkpoint.init_from={cfg.checkpoint.init_from} is not used: this run resumes its own step")
        return restored
    if cfg.checkpoint.init_from:
        params, model_state, source = warmstart.load(cfg.checkpoint.init_from, plan.model, plan.shardings)
        log.info(f"initialised the model from {source}; fresh optimizer state, step 0")
        return plan.start_from(params, model_state)
    return plan.init()[0]


def _optimizer(cfg: Config, given: tuple[optax.GradientTransformation, optax.Schedule | None] | None,
               model: ModelDef, selection: roles.Selection | None
               ) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
    """cfg's optimizer, or the caller's, wrapped in prune.* unless it prunes already (never silently dense)."""
    if given is None:
        return make_optimizer(cfg.optim, cfg.run.steps, cfg.prune, selection, model.stacked)
    tx, schedule = given
    if cfg.prune.enabled and find_prune_state(jax.eval_shape(tx.init, model.params)) is None:
        log.info("prune.* is set: the optimizer passed to train_model is wrapped in pruning (jaxinfra.with_pruning; "
                 "pass an optimizer that already prunes to place it yourself)")
        tx = with_pruning(tx, cfg.prune, selection)
    return tx, schedule


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the loop needs besides the state and the data: the run's config (with its measured peak),
    the step's plan, the saver, the metrics writer and the caller's options."""

    cfg: Config
    plan: StepPlan
    saver: Saver
    writer: MetricsWriter
    options: TrainOptions
    eval_fn: EvalFn
    lead: bool
    t_start: float
    eval_examples: int  # len(eval_source): what evaluation leaves out is said


def _mirror(cfg: Config, lead: bool) -> Mirror:
    """The local folder of a remote run folder's logs (process 0 uploads it), its metrics fetched."""
    mirror = Mirror(cfg.run.path, cfg.run.logs if lead else "")
    if mirror.active and lead:
        log.info(f"run folder {cfg.run.path}: logs are written to {cfg.run.logs} and uploaded at each checkpoint "
                 f"and at the end")
        mirror.pull(METRICS)  # a restart on another machine continues the store's metrics
    return mirror


def _write(run: _Run, name: str, text: str) -> None:
    """A text file in the run folder (process 0 only)."""
    if run.lead:
        os.makedirs(run.cfg.run.logs, exist_ok=True)
        path = os.path.join(run.cfg.run.logs, name)
        with naming(path), open(path, "w") as f:
            f.write(text)


def _row_block(mesh: Mesh, rules: Mapping[str, Any], rows: int) -> tuple[int, int]:
    """(block, blocks): this process's devices hold block `block` of `blocks` equal, contiguous row blocks of
    each (micro-)batch of `rows`, so it reads that block. Processes that differ only along an axis the batch
    is replicated over (a hybrid mesh's mesh.dcn_stage or mesh.dcn_tensor) hold, and read, the same rows."""
    held = NamedSharding(mesh, shd.batch_spec(rules, 1)).addressable_devices_indices_map((rows,)).values()
    spans = sorted({(i[0].start or 0, rows if i[0].stop is None else i[0].stop) for i in held})
    lo, hi = spans[0][0], spans[-1][1]
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or rows % (hi - lo) or lo % (hi - lo):
        raise UserError(f"process {jax.process_index()} holds rows {spans} of each batch of {rows}: not one block "
                        f"of equal blocks; lay the mesh out so each process holds contiguous batch rows")
    return lo // (hi - lo), rows // (hi - lo)


def _train(run: _Run, state: TrainState, train_source: data_lib.Source, spec: dict, eval_host: list) -> dict:
    """Report the plan, compile, train, evaluate and finish (inside the mesh scope): the run top to bottom."""
    cfg, plan, saver, writer, o = run.cfg, run.plan, run.saver, run.writer, run.options
    start, B = int(state.step), cfg.data.batch_size
    if o.flops_per_token:
        log.info(f"MFU is taken against {cfg.run.peak_flops / 1e9:,.1f} GFLOP/s ({o.compute_dtype} matmul peak of "
                 f"the mesh); the model costs {o.flops_per_token / 1e6:,.2f} MFLOP per token")
    _write(run, "config.yaml", to_yaml(cfg))
    for line in cfg.prune.warnings(cfg.run.steps):
        log.info(line)
    _report_sharding(run)

    t0 = time.perf_counter()
    compiled = plan.compile()
    log.info(f"train step compiled in {time.perf_counter() - t0:.1f}s")
    block, blocks = _row_block(plan.mesh, cfg.mesh.logical_rules, B // cfg.optim.grad_accum)
    loader = data_lib.train_batches(train_source, B, cfg.run.seed, start=start, spec=spec,
                                    process_index=block, process_count=blocks)
    batches = data_lib.global_batches(iter(loader), plan.batch_shardings, cfg.optim.grad_accum)
    writer.open(initial_step=start)
    reporter = Reporter(writer, log_every=cfg.run.log_every, last_step=cfg.run.steps,
                        tokens_per_step=B * o.tokens_per_example, tokens_per_example=o.tokens_per_example,
                        flops_per_token=o.flops_per_token, peak_flops=cfg.run.peak_flops)
    evaluator = None
    if eval_host:
        eval_set = evaluation.place(eval_host, plan.micro_shardings, plan.mesh,
                                    shd.batch_divisor(plan.mesh, cfg.mesh.logical_rules))
        log.info(evaluation.eval_summary(eval_host, run.eval_examples, cfg))
        evaluator = Evaluator(mean_eval(make_eval_step(plan.model, run.eval_fn, plan.mesh), eval_set),
                              cfg.run.eval_every, cfg.run.steps)
    profile = perf.ProfileWindow(os.path.join(cfg.run.logs, "profile"), list(cfg.run.profile_steps))
    try:
        state = fit(state, compiled, batches, steps=cfg.run.steps, reporter=reporter, evaluator=evaluator,
                    profile=profile, saver=saver)
        if start == cfg.run.steps:  # restarted when already done: it may have died before finishing
            log.info(f"step {start} is the last one: completing the final evaluation and export it still owes")
            if evaluator is not None:
                reporter.evaluated(start, evaluator.run(state))
            saver.owe_final_export(start)
    finally:
        profile.close()
        writer.close()

    final = {"start_step": start, **reporter.final, "model": plan.model.module(state.params, state.model_state)}
    if run.lead and cfg.run.plot:
        _plot(cfg.run.logs)
    if saver.stopped_at is not None:
        return {**final, "stopped_at": saver.stopped_at}
    _report_sparsity(run, state)
    if o.on_finish is not None:
        o.on_finish(Finished(plan.graphdef, state, plan.mesh, dict(cfg.mesh.logical_rules), final, plan.model))
    written, failed = saver.finish()
    for path in written:
        log.info(f"exported {path}")
    if failed and cfg.checkpoint.export_errors == "fail":
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise Failed(f"{failed[0]}{more}; the checkpoints are saved: export them with scripts/export.py "
                     f"(or set checkpoint.export_errors=warn)")
    for line in failed:
        log.warning(f"warning: {line}")
    final["wall_s"] = time.perf_counter() - run.t_start
    log.info(f"done in {final['wall_s']:.0f}s; run folder {cfg.run.path}")
    return final


def _report_sharding(run: _Run) -> None:
    """Parameters, their shardings and the bytes per device: printed and written to sharding.txt."""
    plan, mesh = run.plan, run.plan.mesh
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(plan.abstract.params))
    lines, warning = shd.report(plan.abstract.params, plan.logical, plan.shardings.params,
                                plan.abstract.opt_state, plan.shardings.opt_state,
                                meant_to_shard=mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1)
    log.info(f"model: {n_params:,} parameters; sharding:\n  " + "\n  ".join(lines))
    if warning:
        log.info(warning)
    _write(run, "sharding.txt", "\n".join(lines + ([warning] if warning else [])) + "\n")


def _report_sparsity(run: _Run, state: TrainState) -> None:
    """One row per pruned tensor (zeros counted in the parameters, the mask's fraction): printed and
    written to sparsity.txt, wherever the prune transformation sits in the optimizer."""
    pruned = find_prune_state(state.opt_state)
    if pruned is None:
        return
    stacked = run.plan.model.stacked
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    leads = [lead_of(path_str(p), x.shape, stacked) for p, x in flat]

    def per_layer(params: Any, masks: Any) -> list[tuple[jax.Array, jax.Array]]:
        """(zeros, pruned) of each pruned tensor, per layer of a stacked one."""
        out = []
        for x, m, n in zip(jax.tree.leaves(params), jax.tree.leaves(masks), leads):
            if m.ndim:
                axes = tuple(range(n, x.ndim))
                out.append((jnp.sum(x == 0, axis=axes).reshape(-1), jnp.sum(~m, axis=axes).reshape(-1)))
        return out
    counts = iter(jax.device_get(jax.jit(per_layer)(state.params, pruned.masks)))
    rows = [f"{'tensor':32s} {'zeros':>10s} {'of':>10s} {'sparsity':>8s}"]
    total = [0, 0]
    for (path, x), m in zip(flat, jax.tree.leaves(pruned.masks)):
        if not m.ndim:
            continue
        zeros, masked = next(counts)
        names = layer_names(path_str(path), x.shape, stacked) or [path_str(path)]
        size = x.size // len(names)
        for name, z, k in zip(names, zeros, masked):
            total[0], total[1] = total[0] + int(z), total[1] + size
            rows.append(f"{name:32s} {int(z):10,d} {size:10,d} {int(k) / size:8.2%}")
    rows.append(f"{'all pruned tensors':32s} {total[0]:10,d} {total[1]:10,d} {total[0] / max(total[1], 1):8.2%}")
    log.info("sparsity per pruned tensor:\n  " + "\n  ".join(rows))
    _write(run, "sparsity.txt", "\n".join(rows) + "\n")


def _plot(run_dir: str) -> None:
    """plots.png in the run folder; a failure to plot never fails the run."""
    from jaxinfra.train.plots import plot_run  # matplotlib only when plotting
    try:
        log.info(f"plots: {plot_run(run_dir)}")
    except Exception as e:  # noqa: BLE001 (a plot is a convenience: report and carry on)
        log.warning(f"warning: no plots ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
