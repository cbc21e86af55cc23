"""Step time of each parallel layout, as a ratio to the hand-written baseline on the same mesh.

python benchmarks/parallel.py [--steps N] [--rounds R]: 8 simulated CPU devices; for each layout
both loops run in this process, alternating, and the ratio of median step times is printed.
Ratios are the claim: absolute CPU times vary run to run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from benchmarks.baseline import make_baseline  # noqa: E402
from jaxinfra import sharding as shd  # noqa: E402
from jaxinfra import train  # noqa: E402
from jaxinfra.config import load_config  # noqa: E402
from jaxinfra.mesh import make_mesh  # noqa: E402
from jaxinfra.model import Transformer, lm_loss  # noqa: E402
from jaxinfra.optim import make_optimizer  # noqa: E402

LAYOUTS = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (4, 2, 1)]


def measure(shape: tuple[int, int, int], steps: int, rounds: int) -> dict:
    """Median per-step wall time of jaxinfra's fit loop and of the baseline loop, alternating."""
    cfg = load_config(None, ["model.n_heads=8", f"run.steps={10**6}"])
    n = int(np.prod(shape))
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    rules = {k: tuple(v) for k, v in cfg.mesh.rules.items()}
    B, L = cfg.data.batch_size, cfg.model.seq_len
    tokens = np.random.default_rng(0).integers(0, 256, (B, L + 1), dtype=np.int32)
    with jax.set_mesh(mesh):
        constrain = shd.LogicalConstraint(mesh, rules)
        model_fn = lambda: Transformer(cfg.model, rngs=nnx.Rngs(0), constrain=constrain)
        tx, schedule = make_optimizer(cfg.optim, cfg.run.steps)
        setup = train.init_state(model_fn, tx, mesh, rules)
        batch_sh = {"tokens": NamedSharding(mesh, shd.batch_spec(rules, 2))}
        example = {"tokens": jax.ShapeDtypeStruct(tokens.shape, jnp.int32, sharding=batch_sh["tokens"])}
        t0 = time.perf_counter()
        compiled = train.compile_train_step(train.make_train_step(setup.graphdef, lm_loss, tx, schedule),
                                            setup, batch_sh, example)
        compile_s = time.perf_counter() - t0
        batch = {"tokens": jax.device_put(tokens, batch_sh["tokens"])}
        base_step, params, opt_state, base_sh = make_baseline(model_fn, tx, mesh, rules)
        base_tokens = jax.device_put(tokens, base_sh)
        state = setup.state
        ours, theirs = [], []
        for r in range(rounds + 1):  # round 0 warms both up
            t0 = time.perf_counter()
            state = train.fit(state, compiled, iter(lambda: batch, None), steps=int(state.step) + steps,
                              tokens_per_step=B * L, log=lambda s, m: None)
            jax.block_until_ready(state)
            t_ours = (time.perf_counter() - t0) / steps
            t0 = time.perf_counter()
            for _ in range(steps):
                params, opt_state, loss = base_step(params, opt_state, base_tokens)
            jax.block_until_ready((params, opt_state, loss))
            t_base = (time.perf_counter() - t0) / steps
            if r:
                ours.append(t_ours)
                theirs.append(t_base)
    med_ours, med_base = statistics.median(ours), statistics.median(theirs)
    return {"layout": "x".join(map(str, shape)), "devices": n, "step_ms": 1e3 * med_ours,
            "baseline_step_ms": 1e3 * med_base, "ratio": med_ours / med_base, "compile_s": compile_s,
            "tokens_per_sec": B * L / med_ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layouts", default=",".join("x".join(map(str, s)) for s in LAYOUTS),
                   help="comma-separated data x fsdp x tensor shapes, e.g. 1x1x8,2x2x2")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "parallel-cpu.json"))
    args = p.parse_args()
    rows = []
    print(f"{'layout':8s} {'devices':>7s} {'step ms':>8s} {'baseline':>9s} {'ratio':>6s} {'tokens/s':>9s}")
    for shape in [tuple(int(n) for n in text.split("x")) for text in args.layouts.split(",")]:
        row = measure(shape, args.steps, args.rounds)
        rows.append(row)
        print(f"{row['layout']:8s} {row['devices']:7d} {row['step_ms']:8.1f} {row['baseline_step_ms']:9.1f} "
              f"{row['ratio']:6.3f} {row['tokens_per_sec']:9.0f}", flush=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/parallel.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
