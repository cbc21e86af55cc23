"""Pruning benchmarks: what a mask update costs, and what pruning does to quality.

python benchmarks/pruning.py cost      step time on (2,2,2): dense, a mask update every step,
                                       masks held (the 99 steps of 100 that update nothing)
python benchmarks/pruning.py quality   the default LM on the stdlib corpus, several seeds: dense,
                                       80% unstructured, 2:4, 90% magnitude and 90% random
Both write benchmarks/results/pruning-<mode>-<host>.json. Ratios are the claims. --smoke: either mode
on the tiny model, briefly (a check; the results go to a temporary folder).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import jax

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # only the CPU backend reads it (and the CPU collective flag: jaxinfra/parallel/mesh.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import TINY, host_kind, meta, parse, results_path, write  # noqa: E402
from benchmarks.run import lm_plan  # noqa: E402
from jaxinfra.parallel.mesh import make_mesh  # noqa: E402
from jaxinfra.settings.loading import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
BIG = 10 ** 6
BATCH = "data.batch_size=32"  # the documented figures' batch (the default job's was 32 until 2026-12-05)
BYTES = "data.tokenizer=bytes"  # and their vocabulary (the default job's until 2026-12-06)


def cost(steps: int, rounds: int, extra: list[str] = ()) -> dict[str, Any]:
    """Median step time of dense / update-every-step / masks-held steps, alternating in one process (`extra`
    overrides on top)."""
    cfg = load_config(DEFAULT, [BATCH, BYTES, f"run.steps={BIG}", *extra])
    mesh = make_mesh(2, 2, 2)
    B, L = cfg.data.batch_size, cfg.model.seq_len
    tokens = np.random.default_rng(0).integers(0, 256, (B, L + 1), dtype=np.int32)
    variants = {  # the cubic schedule reaches 80% at step 1e6: every update re-ranks the tensor
        "dense": ["prune.sparsity=0"],
        "update": ["prune.sparsity=0.8", "prune.every=1", f"prune.end_step={BIG - 1}"],
        "held": ["prune.sparsity=0.8", f"prune.start_step={BIG - 2}", f"prune.end_step={BIG - 1}"],
    }
    loops, times = {}, {name: [] for name in variants}
    with jax.set_mesh(mesh):
        for name, overrides in variants.items():
            plan = lm_plan(load_config(DEFAULT, [BATCH, BYTES, f"run.steps={BIG}", *extra] + overrides), mesh)
            loops[name] = (plan.compile(), plan.init()[0])
        batch = {"tokens": jax.device_put(tokens, plan.batch_shardings["tokens"])}
        for r in range(rounds + 1):  # round 0 warms up
            for name, (step, train_state) in loops.items():
                t0 = time.perf_counter()
                for _ in range(steps):  # bare dispatches: the step's own cost, not the loop's
                    train_state, metrics = step(train_state, batch)
                jax.block_until_ready(train_state)
                loops[name] = (step, train_state)
                if r:
                    times[name].append((time.perf_counter() - t0) / steps)
    med = {name: statistics.median(t) for name, t in times.items()}
    sparsity = float(metrics["sparsity"])  # the last variant's: masks held at 0 (before start)
    every_100 = (99 * med["held"] + med["update"]) / 100
    return {"step_ms": {k: 1e3 * v for k, v in med.items()}, "update_ratio": med["update"] / med["dense"],
            "held_ratio": med["held"] / med["dense"], "every_100_ratio": every_100 / med["dense"],
            "held_sparsity_check": sparsity, "steps": steps, "rounds": rounds}


QUALITY = {
    "dense": [],
    "80% unstructured": ["prune.sparsity=0.8"],
    "80% ERK": ["prune.sparsity=0.8", "prune.distribution=erk"],
    "2:4": ["prune.pattern=2:4"],
    "90% magnitude": ["prune.sparsity=0.9"],
    "90% random": ["prune.sparsity=0.9", "prune.criterion=random"],
}


def quality(seeds: int, steps: int, only: list[str] | None, window: tuple[float, float] = (0.1, 0.6),
            extra: list[str] | None = None) -> dict[str, Any]:
    """Final held-out loss of each variant and seed (default job, shortened, `extra` overrides on
    top); ratios to dense. Pruning runs over the fractions `window` of the run; the rest recovers."""
    from jaxinfra.lm.job import run
    start, end = round(steps * window[0]), round(steps * window[1])
    # (4, 2, 1): with tensor=2 the 4 heads of wo split 2 per device, and 2:4 groups need 4 per device
    common = [BATCH, BYTES, "mesh.data=4", "mesh.fsdp=2", "mesh.tensor=1", f"run.steps={steps}", "run.eval_every=0",
              "run.eval_batches=8", "run.progress=false",
              "run.sample_tokens=0", "checkpoint.every=0", "checkpoint.export_final=false",
              f"prune.start_step={start}", f"prune.end_step={end}", "prune.every=10"] + list(extra or [])
    out: dict[str, Any] = {"steps": steps, "prune_window": [start, end], "overrides": list(extra or []), "runs": {}}
    names = [name for name in QUALITY if not only or name in only]
    losses: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):  # seeds outermost: the first seed's ratios print early
            for name in names:
                cfg = load_config(DEFAULT, common + QUALITY[name] + [f"run.seed={seed}",
                                                                     f"run.dir={tmp}/{names.index(name)}-{seed}"])
                t0 = time.perf_counter()
                final = run(cfg)
                losses[name].append(final["eval_loss"])
                print(f"## {name} seed {seed}: eval loss {final['eval_loss']:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
    out["runs"] = {name: {"eval_loss": x, "mean": statistics.mean(x)} for name, x in losses.items()}
    dense = out["runs"].get("dense", {}).get("mean")
    for row in out["runs"].values():
        row["ratio_to_dense"] = row["mean"] / dense if dense else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("cost", "quality"))
    p.add_argument("--steps", type=int, help="cost: steps per timed block (10); quality: steps per run (300)")
    p.add_argument("--rounds", type=int, default=5, help="cost: timed blocks after a warm-up block")
    p.add_argument("--seeds", type=int, default=3, help="quality: seeds per variant")
    p.add_argument("--only", nargs="*", help="quality: a subset of variants, e.g. dense '2:4'")
    p.add_argument("--window", nargs=2, type=float, default=(0.1, 0.6), metavar=("START", "END"),
                   help="quality: prune from START to END, as fractions of the run (0.1 0.6)")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="config overrides for every run, e.g. model.d_model=256 model.d_ff=1024")
    # --smoke: the tiny model; cost: 2 steps, 1 round; quality: 2 variants, 1 seed, 20 steps, a mask update
    # every 2 steps, no scoring of every held-out byte
    args = parse(p, None, rounds=1, seeds=1, only=["dense", "80% unstructured"],
                 set=TINY + ["prune.every=2", "run.score_heldout=false", "run.plot=false"])
    steps = args.steps or {"cost": (10, 2), "quality": (300, 20)}[args.mode][args.smoke]  # (full, smoke)
    if args.mode == "cost":
        result = cost(steps, args.rounds, args.set)
        s = result["step_ms"]
        print(f"dense {s['dense']:.1f} ms, mask update every step {s['update']:.1f} ms "
              f"({result['update_ratio']:.3f}x), masks held {s['held']:.1f} ms ({result['held_ratio']:.3f}x); "
              f"updates every 100 steps: mean step {result['every_100_ratio']:.3f}x dense")
    else:
        result = quality(args.seeds, steps, args.only, tuple(args.window), args.set)
        for name, row in result["runs"].items():
            ratio = f"{row['ratio_to_dense']:.3f}x dense" if row["ratio_to_dense"] else ""
            print(f"{name:18s} mean eval loss {row['mean']:.4f} {ratio}  "
                  f"({', '.join(f'{x:.4f}' for x in row['eval_loss'])})")
    result["meta"] = meta(__file__, None, args)
    write(results_path(args, f"pruning-{args.mode}-{host_kind()}.json"), result)


if __name__ == "__main__":
    main()
