"""The default job's shape and schedule, chosen by measurement: held-out bits per byte (every held-out
byte, heldout.py) after the same wall-clock training budget on this machine.

python benchmarks/default_sweep.py [--budget SECONDS] [--only NAME ...]: for each candidate (overrides of
the default config), a 20-step probe measures its tokens/s, then a run of as many steps as fill the
budget trains it on the default corpus; the final line's figure, wall times and throughput are printed
and written to benchmarks/results/default-sweep-<host-kind>.json (appended by candidate, so a sweep can
be run in parts; --out: elsewhere). Each run is `scripts/train.py` in a fresh process, as a user starts it.
python benchmarks/default_sweep.py --curve "old=RUN_A" "new=RUN_B" [--out PNG]: the curve of two runs.
python benchmarks/default_sweep.py --smoke: the first candidate on the tiny model, a few steps (a check).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["run.progress=false", "run.plot=false", "run.sample_tokens=0", "checkpoint.export_final=false"]
ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.cpu_devices=1"]

# name -> overrides of configs/default.yaml, on bytes (the tokenizer's sweep: tokenizer_sweep.py)
BYTES = "data.tokenizer=bytes"
CANDIDATES = {
    "d128-s128-b32 (old default)": [],
    "d128-s128-b32 lr6e-3": ["optim.lr=6e-3"],
    "d128-s128-b32 1 device": ONE_DEVICE,
    "d128-s256-b32": ["model.seq_len=256"],
    "d192-s128-b64": ["model.d_model=192", "model.d_ff=576", "data.batch_size=64"],
    "d192-s256-b32": ["model.d_model=192", "model.d_ff=576", "model.seq_len=256"],
    "d256-s128-b32": ["model.d_model=256", "model.d_ff=768"],
    "d128x6-s128-b32": ["model.n_layers=6"],
    "d128-s128-b16": ["data.batch_size=16"],
    "d128-s128-b16 lr5e-3": ["data.batch_size=16", "optim.lr=5e-3"],
    "d96-s128-b16": ["model.d_model=96", "model.d_ff=288", "data.batch_size=16"],
    "d128-s128-b8": ["data.batch_size=8"],
    "d128-s128-b16 1 device": ["data.batch_size=16", *ONE_DEVICE],
}


def _train(args: list[str], run_dir: str, timeout: float) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args, f"run.dir={run_dir}"],
                          capture_output=True, text=True, cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1"),
                          timeout=timeout)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout, time.perf_counter() - t0


def measure(name: str, overrides: list[str], budget: float, scratch: str, probe: int = 20,
            min_steps: int = 50) -> dict:
    """Probe the candidate's speed (`probe` steps), then train it for about `budget` seconds (at least
    `min_steps`); its figures."""
    from jaxinfra.settings.loading import load_config
    from jaxinfra.train.plots import read_metrics
    probe_dir = os.path.join(scratch, "probe")
    shutil.rmtree(probe_dir, ignore_errors=True)
    overrides = [BYTES, *overrides]
    _train([*overrides, *QUIET, f"run.steps={probe}", f"run.log_every={max(probe // 10, 1)}", "run.eval_batches=0"],
           probe_dir, 600)
    tok_s = statistics.median(r["tokens_per_sec"] for r in read_metrics(probe_dir)[3:] if "tokens_per_sec" in r)
    cfg = load_config(None, overrides)
    tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    steps = max(min_steps, int(budget * tok_s / tokens_per_step) // 10 * 10)
    run_dir = os.path.join(scratch, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    out, wall = _train([*overrides, *QUIET, f"run.steps={steps}", f"run.eval_every={max(steps // 5, 1)}",
                        f"optim.warmup_steps={max(steps // 20, 10)}"], run_dir, 3600)
    final = re.search(r"final held-out bits per byte over all ([\d,]+) held-out bytes: ([\d.]+) "
                      r"\(zlib -9: ([\d.]+), xz -9e: ([\d.]+)", out)
    rows = read_metrics(run_dir)
    train = [r for r in rows if "tokens_per_sec" in r]
    return {"name": name, "overrides": overrides, "steps": steps, "tokens": steps * tokens_per_step,
            "probe_tokens_per_sec": tok_s, "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in train),
            "mfu": statistics.median(r["mfu"] for r in train), "wall_s": wall,
            "train_s": sum(r["step_time_s"] for r in train) / len(train) * steps if train else None,
            "heldout_bpb": float(final.group(2)), "zlib_bpb": float(final.group(3)), "xz_bpb": float(final.group(4)),
            "sampled_eval_bpb": [(r["step"], r["eval_bpb"]) for r in rows if "eval_bpb" in r]}


def curve(runs: list[tuple[str, str]], out: str) -> str:
    """PNG of held-out bits per byte (the periodic sampled evaluations) against training seconds (the
    steps' logged times summed) for each (label, run folder): the old and the new default side by side."""
    from jaxinfra.train import plots
    fig, (ax,) = plots.new_figure(1)
    for label, run_dir in runs:
        rows = plots.read_metrics(run_dir)
        timed = sorted((r["step"], r["step_time_s"]) for r in rows if "step_time_s" in r)
        seconds, clock, last = {}, 0.0, 0
        for step, dt in timed:  # a row every log_every steps carries that interval's mean step time
            clock += dt * (step - last)
            seconds[step], last = clock, step
        steps, bpb = plots.series(rows, "eval_bpb")
        ax.plot([seconds[s] for s in steps if s in seconds], [b for s, b in zip(steps, bpb) if s in seconds],
                marker="o", markersize=3, label=label)
    ax.set_xlabel("training seconds (2-core CPU, 8 simulated devices)")
    ax.set_ylabel("held-out bits per byte (sampled windows)")
    ax.grid(alpha=0.3)
    ax.legend()
    return plots.save_png(fig, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per candidate")
    p.add_argument("--only", nargs="*", default=None, help="candidate names (default: all)")
    p.add_argument("--curve", nargs="+", metavar="LABEL=RUN_DIR",
                   help="instead of a sweep: plot these runs' held-out bpb against training seconds")
    sys.path.insert(0, ROOT)
    from benchmarks import TINY, parse, results_path, write
    # --smoke: the first candidate on the tiny model, a probe of 8 steps, then 10 steps (--out: the results)
    args = parse(p, None, only=[next(iter(CANDIDATES))], budget=0.0)
    if args.curve:  # --out: the PNG
        png = args.out or os.path.join(ROOT, "docs", "default-curve.png")
        print(curve([tuple(c.split("=", 1)) for c in args.curve], png))
        return
    out_path = results_path(args, f"default-sweep-cpu-{os.cpu_count()}core-{platform.machine()}.json")
    results = json.load(open(out_path)) if os.path.exists(out_path) else {"runs": []}
    scratch = tempfile.mkdtemp(prefix="jaxinfra-sweep-")
    try:
        for name, overrides in CANDIDATES.items():
            if args.only and name not in args.only:
                continue
            sizes = dict(probe=8, min_steps=10) if args.smoke else {}
            row = {**measure(name, overrides + (TINY if args.smoke else []), args.budget, scratch, **sizes),
                   "budget_s": args.budget, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
            print(f"{name:32s} steps {row['steps']:5d}  {row['tokens_per_sec']:8,.0f} tok/s  mfu {row['mfu']:.3f}  "
                  f"wall {row['wall_s']:6.1f} s  held-out {row['heldout_bpb']:.3f} bpb "
                  f"(zlib {row['zlib_bpb']:.3f}, xz {row['xz_bpb']:.3f})", flush=True)
            results["runs"] = [r for r in results["runs"] if (r["name"], r["budget_s"]) != (name, args.budget)] + [row]
            write(out_path, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
