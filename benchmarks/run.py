"""The benchmark harness: matmul peak, tokens/s, MFU, overhead against a hand-written step,
compile time, time to first step, host memory and per-device bytes, on the machine it runs on.

python benchmarks/run.py [--quick]            CPU: default and larger config, 1 device and meshes
python benchmarks/run.py --config configs/gpu_1b.yaml --layouts 1x1x1 --set model.remat=dots
python benchmarks/run.py --smoke              the tiny model on 1x1x1, 2 steps, 1 round (a check)
Writes benchmarks/results/<host-kind>.json (--quick: <host-kind>-quick.json, which git ignores; or
--out). The step is built by step.plan_step and timed through trainer.fit, exactly as a run does.
Ratios are measured in one process, alternating the two loops; on shared CPUs the ratios are the
claims, not absolute times.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from typing import Any

import jax

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # only the CPU backend reads it (and the CPU collective flag: jaxinfra/parallel/mesh.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from benchmarks import TINY, host_kind, meta, parse, results_path, write  # noqa: E402
from benchmarks.baseline import make_baseline  # noqa: E402
from jaxinfra.models import factory
from jaxinfra.models.transformer import lm_loss, train_flops_per_token  # noqa: E402
from jaxinfra.parallel import sharding as shd  # noqa: E402
from jaxinfra.parallel.mesh import make_mesh  # noqa: E402
from jaxinfra.settings.loading import load_config
from jaxinfra.settings.sections import Config  # noqa: E402
from jaxinfra.train import (
    compression,
    perf,  # noqa: E402
)
from jaxinfra.train.metrics import Reporter  # noqa: E402
from jaxinfra.train.optim import make_optimizer  # noqa: E402
from jaxinfra.train.step import (  # noqa: E402
    Field,
    StepPlan,
    abstract_model,
    example_batch,
    plan_step,
)
from jaxinfra.train.trainer import fit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_LAYOUTS = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]
# The larger CPU config: wide enough that matmuls dominate, the goal's case for MFU on one device.
LARGE = ["model.d_model=512", "model.n_heads=8", "model.d_ff=1536", "model.n_layers=4", "model.seq_len=256",
         "data.batch_size=16"]
# The two configs the checkpoint and storage benchmarks save on (2,2,2): overrides of configs/default.yaml
CPU_CONFIGS = {"default": ["model.n_heads=8"], "large": LARGE}


def peak_host_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lm_plan(cfg: Config, mesh: Mesh, optimizer: Any = None) -> StepPlan:
    """The default LM's step on `mesh`, planned as the trainer plans it (call inside jax.set_mesh)."""
    fields = {"tokens": Field((cfg.model.seq_len + 1,), np.int32, ("batch", "seq"))}
    model_fn = factory.model_fn(cfg, mesh)
    model = abstract_model(model_fn)
    selection = None  # what the trainer prunes: roles read from the traced loss, N:M along input features
    micro = example_batch(fields, cfg.data.batch_size // cfg.optim.grad_accum)
    found = compression.model_roles(model, lm_loss, micro)  # read from the float model, as the trainer reads them
    if cfg.quant.enabled:  # as the trainer does: the forward pass rounds the chosen weights
        model, _ = compression.quantized_model(cfg.quant, model, found, cfg.model.dtype)
    if cfg.prune.enabled and optimizer is None:
        selection = compression.pruning_selection(cfg.prune, model, lm_loss, micro, found=found)
    tx, schedule = optimizer or make_optimizer(cfg.optim, cfg.run.steps, cfg.prune, selection, model.stacked)
    return plan_step(model_fn, lm_loss, tx, mesh, cfg.mesh.logical_rules, fields, accum=cfg.optim.grad_accum,
                     batch_size=cfg.data.batch_size, schedule=schedule, model=model)


class Loop:
    """A compiled step and its state, advanced k steps at a time through the trainer's own loop."""

    def __init__(self, plan: StepPlan, batch: Any, tokens_per_step: int):
        self.state, _ = plan.init()
        t0 = time.perf_counter()
        self.compiled = plan.compile()
        self.compile_s = time.perf_counter() - t0
        self.batch, self.tokens = batch, tokens_per_step

    def __call__(self, k: int) -> Any:
        reporter = Reporter(None, log_every=1, last_step=0, tokens_per_step=self.tokens)
        self.state = fit(self.state, self.compiled, iter(lambda: self.batch, None),
                         steps=int(self.state.step) + k, reporter=reporter)
        return self.state


def _median_step(run_steps: Any, steps: int) -> float:
    """Seconds per step of one block of `steps`, synchronised at its end."""
    t0 = time.perf_counter()
    jax.block_until_ready(run_steps(steps))
    return (time.perf_counter() - t0) / steps


def measure(cfg: Config, shape: tuple[int, int, int], steps: int, rounds: int, baseline: bool,
            peak: float, vendor: float | None) -> dict[str, Any]:
    """Set up, compile and time jaxinfra's loop (and the baseline's, alternating) on one layout."""
    n = int(np.prod(shape))
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    rules = cfg.mesh.logical_rules
    B, L = cfg.data.batch_size, cfg.model.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, L + 1), dtype=np.int32)
    row: dict[str, Any] = {"layout": "x".join(map(str, shape)), "devices": n}
    with jax.set_mesh(mesh):
        t_setup = time.perf_counter()
        plan = lm_plan(cfg, mesh)
        ours = Loop(plan, {"tokens": jax.device_put(tokens, plan.batch_shardings["tokens"])}, B * L)
        row["compile_s"] = ours.compile_s
        ours(1)
        row["first_step_s"] = time.perf_counter() - t_setup  # init + compile + one step
        mem = ours.compiled.memory_analysis()
        if mem is not None:
            row["device_temp_gb"] = getattr(mem, "temp_size_in_bytes", 0) / 1e9
        row["param_mb_per_device"] = shd.shard_bytes(ours.state.params, plan.shardings.params) / 1e6
        row["opt_mb_per_device"] = shd.shard_bytes(ours.state.opt_state, plan.shardings.opt_state) / 1e6
        base_times, our_times = [], []
        if baseline:
            base_step, bparams, bopt, base_sh = make_baseline(plan.model_fn, plan.tx, mesh, rules)
            bbox = {"s": (bparams, bopt, None), "tokens": jax.device_put(tokens, base_sh)}

            def theirs(k: int) -> Any:
                p, o, loss = bbox["s"]
                for _ in range(k):
                    p, o, loss = base_step(p, o, bbox["tokens"])
                bbox["s"] = (p, o, loss)
                return bbox["s"]

            theirs(1)
        for r in range(rounds + 1):  # round 0 warms both up
            t = _median_step(ours, steps)
            if r:
                our_times.append(t)
            if baseline:
                t = _median_step(theirs, steps)
                if r:
                    base_times.append(t)
    step_s = statistics.median(our_times)
    fpt = train_flops_per_token(cfg.model)
    row.update(step_ms=1e3 * step_s, tokens_per_sec=B * L / step_s, flops_per_token=fpt,
               mfu=fpt * B * L / step_s / (peak * (1 if jax.devices()[0].platform == "cpu" else n)))
    if vendor:
        row["mfu_vendor"] = fpt * B * L / step_s / (vendor * n)
    if baseline:
        row["baseline_step_ms"] = 1e3 * statistics.median(base_times)
        row["ratio"] = row["step_ms"] / row["baseline_step_ms"]
    row["peak_host_mb"] = peak_host_mb()
    return row


def _print_row(name: str, row: dict[str, Any]) -> None:
    ratio = f"{row['ratio']:.3f}" if "ratio" in row else "-"
    print(f"{name:10s} {row['layout']:7s} {row['step_ms']:9.1f} {row['tokens_per_sec']:10.0f} {row['mfu']:6.1%} "
          f"{ratio:>6s} {row['compile_s']:7.1f} {row['first_step_s']:7.1f} {row['param_mb_per_device']:8.1f} "
          f"{row['opt_mb_per_device']:8.1f} {row['peak_host_mb']:8.0f}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, measure every (config, layout), print a table, write the JSON; returns the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps, default config on 1x1x1 and 2x2x2 only")
    p.add_argument("--config", help="one YAML config instead of the CPU pair (default + larger)")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for --config")
    p.add_argument("--layouts", help="comma-separated data x fsdp x tensor shapes, e.g. 1x1x1,2x2x2")
    p.add_argument("--steps", type=int, help="steps per timed block")
    p.add_argument("--rounds", type=int, help="timed blocks (after one warm-up block)")
    p.add_argument("--no-baseline", action="store_true", help="skip the hand-written step (saves memory)")
    p.add_argument("--name", help="name of this config in the table")
    args = parse(p, argv, quick=True, layouts="1x1x1", steps=2, rounds=1)  # --smoke: and the tiny model
    steps = args.steps or (3 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 5)
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    if args.config:
        jobs = [(args.name or os.path.splitext(os.path.basename(args.config))[0], args.config, args.set)]
    else:
        default = os.path.join(ROOT, "configs", "default.yaml")
        jobs = [("default", default, ["model.n_heads=8", "data.batch_size=32"])]  # 8 heads: tensor=8 divides; batch 32 as measured before the default job went to 16
        if not args.quick:
            jobs.append(("large", default, LARGE))
    if args.smoke:
        jobs = [(name, path, [*overrides, *TINY]) for name, path, overrides in jobs]
    layouts = args.layouts or ("1x1x1,2x2x2" if args.quick else ",".join("x".join(map(str, s)) for s in CPU_LAYOUTS))
    shapes = [tuple(int(n) for n in text.split("x")) for text in layouts.split(",")]
    first = load_config(jobs[0][1], jobs[0][2])
    t0 = time.perf_counter()
    peak = perf.matmul_peak(device, first.model.dtype, n=512 if args.smoke else None)
    vendor = perf.vendor_peak(device, first.model.dtype)
    print(f"{device.device_kind} ({device.platform}, {jax.device_count()} devices): measured {first.model.dtype} "
          f"matmul peak {peak / 1e12:.3f} TFLOP/s per device ({time.perf_counter() - t0:.1f}s)"
          + (f", vendor peak {vendor / 1e12:.0f} TFLOP/s" if vendor else ""))
    print(f"{'config':10s} {'layout':7s} {'step ms':>9s} {'tokens/s':>10s} {'MFU':>6s} {'ratio':>6s} "
          f"{'compile':>7s} {'first':>7s} {'param MB':>8s} {'opt MB':>8s} {'host MB':>8s}")
    rows = []
    for name, path, overrides in jobs:
        cfg = load_config(path, list(overrides) + ["run.steps=1000000"])
        for shape in shapes:
            if name == "large" and shape != (1, 1, 1) and shape != (2, 2, 2):
                continue  # the larger config answers the one-device MFU goal; 2x2x2 for scale
            row = measure(cfg, shape, steps, rounds, not args.no_baseline, peak, vendor)
            row["config"] = name
            row["model"] = {k: getattr(cfg.model, k) for k in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len",
                                                                 "dtype", "remat", "attention")}
            row["batch_size"] = cfg.data.batch_size
            rows.append(row)
            _print_row(name, row)
    result = {"meta": meta(__file__, argv, args, device_kind=device.device_kind, devices=jax.device_count(),
                           cpus=os.cpu_count(), peak_flops=peak, vendor_peak_flops=vendor, dtype=first.model.dtype,
                           simulated_devices=on_cpu, steps=steps, rounds=rounds),
              "rows": rows}
    # --quick is a short run: it never replaces the recorded full figures
    write(results_path(args, f"{host_kind()}{'-quick' if args.quick else ''}.json"), result)
    return result


if __name__ == "__main__":
    main()
