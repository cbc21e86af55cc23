"""Stacked layers at depth: compile time of the default model's train step with its blocks stacked and
scanned (model.scan_layers=true) or stacked and unrolled (the default), against the same blocks as a
Python list (the model before stacking, rebuilt here as the baseline), on one device, at several
depths; and the pipeline's bubble per schedule.

python benchmarks/pipeline.py [--depths 4,16,32] [--smoke]
Both compile in one process, alternating. Writes benchmarks/results/pipeline-<host>.json. Step time of
pipelined meshes is not measured here: simulated CPU devices share the machine's cores, so a stage
waiting on another is not idle time (a GPU session with several devices would measure it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import TINY, host_kind, meta, parse, results_path, write  # noqa: E402
from jaxinfra.models.transformer import (  # noqa: E402
    Block,
    Constrain,
    RMSNorm,
    Transformer,
    _param,
    lm_loss,
)
from jaxinfra.parallel import sharding as shd  # noqa: E402
from jaxinfra.parallel.mesh import make_mesh  # noqa: E402
from jaxinfra.parallel.pipeline import idle_fraction, schedule  # noqa: E402
from jaxinfra.settings.loading import load_config
from jaxinfra.settings.model import ModelConfig  # noqa: E402
from jaxinfra.train.optim import make_optimizer  # noqa: E402
from jaxinfra.train.step import Field, plan_step  # noqa: E402


class ListOfBlocks(nnx.Module):
    """The baseline: model.Transformer as it was before stacking, its blocks a list run by a Python loop
    (the compiler sees every layer's ops once per layer)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, constrain: Constrain):
        pdt = np.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1.0, pdt)
        self.blocks = nnx.List([Block(cfg, rngs=rngs, constrain=constrain) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        self.head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model ** -0.5, pdt)
        self.constrain = constrain

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        x = jax.numpy.take(self.constrain(self.embed[...], (None, None)), tokens_BxT, axis=0)
        for block in self.blocks:
            x = block(x)
        logits = jax.numpy.einsum("btd,dv->btv", self.final_norm(x), self.head[...])
        return self.constrain(logits, ("batch", "seq", "vocab"))


def compile_s(cfg: Any, mesh: Any, variant: str) -> float:
    """Seconds to trace, lower and compile the train step (the trainer's plan) of a variant (list, scan,
    unrolled), once."""
    constrain = shd.LogicalConstraint(mesh, cfg.mesh.logical_rules)
    model_cfg = dataclasses.replace(cfg.model, scan_layers=variant == "scan")
    build = (lambda: ListOfBlocks(cfg.model, rngs=nnx.Rngs(0), constrain=constrain)) if variant == "list" \
        else (lambda: Transformer(model_cfg, rngs=nnx.Rngs(0), constrain=constrain))
    tx, schedule_fn = make_optimizer(cfg.optim, cfg.run.steps, cfg.prune)
    fields = {"tokens": Field((cfg.model.seq_len + 1,), np.int32, ("batch", "seq"))}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        plan_step(build, lm_loss, tx, mesh, cfg.mesh.logical_rules, fields, batch_size=cfg.data.batch_size,
                  schedule=schedule_fn).compile()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compile both at each depth, print a table, write the JSON; returns the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="4,16,32", help="comma-separated n_layers")
    args = parse(p, argv, depths="2")  # --smoke: and the tiny model
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rows = []
    print(f"{'layers':>6s} {'list s':>8s} {'scan s':>8s} {'unrolled s':>10s} {'list/scan':>9s}", flush=True)
    for depth in (int(d) for d in args.depths.split(",")):
        cfg = load_config(None, (TINY if args.smoke else []) + [f"model.n_layers={depth}"])
        row: dict[str, Any] = {"n_layers": depth}
        for variant in ("list", "scan", "unrolled"):
            jax.clear_caches()
            row[f"{variant}_compile_s"] = compile_s(cfg, mesh, variant)
        row["ratio"] = row["list_compile_s"] / row["scan_compile_s"]
        rows.append(row)
        print(f"{depth:6d} {row['list_compile_s']:8.2f} {row['scan_compile_s']:8.2f} {row['unrolled_compile_s']:10.2f} "
              f"{row['ratio']:8.1f}x", flush=True)
    bubbles = [{"stages": S, "microbatches": M, "repeats": R, "idle_fraction": idle_fraction(schedule(S, M, R)),
                "formula": (S - 1) / (R * M + S - 1)}
               for S, M, R in [(2, 2, 1), (2, 8, 1), (4, 4, 1), (4, 16, 1), (4, 8, 2), (8, 32, 1), (8, 16, 4)]]
    result = {"compile": rows, "bubble": bubbles,
              "meta": meta(__file__, argv, args, load_avg_1m=os.getloadavg()[0], devices=str(jax.devices()[0]))}
    write(results_path(args, f"pipeline-{host_kind()}.json"), result)
    return result


if __name__ == "__main__":
    main()
