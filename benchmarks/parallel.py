"""Step time of each parallel layout, as a ratio to the hand-written baseline on the same mesh.

python benchmarks/parallel.py [--steps N] [--rounds R] [--smoke]: 8 simulated CPU devices; for each layout
both loops run in this process, alternating, and the ratio of median step times is printed.
Ratios are the claim: absolute CPU times vary run to run.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # only the CPU backend reads it (and the CPU collective flag: jaxinfra/parallel/mesh.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import TINY, meta, parse, results_path, run, write  # noqa: E402
from jaxinfra.settings.loading import load_config  # noqa: E402
from jaxinfra.train import perf  # noqa: E402

LAYOUTS = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (4, 2, 1)]


def measure(shape: tuple[int, int, int], steps: int, rounds: int, smoke: bool = False) -> dict:
    """Median per-step wall time of jaxinfra's fit loop and of the baseline loop (run.measure), alternating."""
    # batch 32: the documented figures
    cfg = load_config(None, ["model.n_heads=8", "data.batch_size=32", f"run.steps={10**6}", *(TINY if smoke else [])])
    peak = perf.matmul_peak(dtype=cfg.model.dtype, n=512 if smoke else None)
    row = run.measure(cfg, shape, steps, rounds, True, peak, None)
    return {k: row[k] for k in ("layout", "devices", "step_ms", "baseline_step_ms", "ratio", "compile_s",
                                "tokens_per_sec")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layouts", default=",".join("x".join(map(str, s)) for s in LAYOUTS),
                   help="comma-separated data x fsdp x tensor shapes, e.g. 1x1x8,2x2x2")
    args = parse(p, None, steps=2, rounds=1, layouts="2x2x2")  # --smoke: and the tiny model
    rows = []
    print(f"{'layout':8s} {'devices':>7s} {'step ms':>8s} {'baseline':>9s} {'ratio':>6s} {'tokens/s':>9s}")
    for shape in [tuple(int(n) for n in text.split("x")) for text in args.layouts.split(",")]:
        row = measure(shape, args.steps, args.rounds, args.smoke)
        rows.append(row)
        print(f"{row['layout']:8s} {row['devices']:7d} {row['step_ms']:8.1f} {row['baseline_step_ms']:9.1f} "
              f"{row['ratio']:6.3f} {row['tokens_per_sec']:9.0f}", flush=True)
    write(results_path(args, "parallel-cpu.json"),
          {"meta": meta(__file__, None, args, machine=platform.machine(), cpus=os.cpu_count()), "rows": rows})


if __name__ == "__main__":
    main()
