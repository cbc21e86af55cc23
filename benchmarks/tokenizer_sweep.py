"""The tokenizer of the default job, chosen by measurement: held-out bits per byte over every held-out byte
after the same WALL time, start to finish (tokenizer training, tokenization, compilation, training, the
evaluations and the final scoring all counted), each run `scripts/train.py` in a fresh process with a cold
token cache, as a user starts it.

python benchmarks/tokenizer_sweep.py [--budget SECONDS] [--only NAME ...]: for each candidate, a probe run
(30 steps, cold) measures the fixed cost (start-up, tokenizer, cache, compile) and the step time; a second
cold run gets as many steps as fill the budget. Rows go to benchmarks/results/tokenizer-sweep-<host>.json.
python benchmarks/tokenizer_sweep.py --smoke: bpe:512 on the tiny model, a few steps (a check).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.default_sweep import QUIET, _train  # noqa: E402  (the sweep's own runner, one home)

# name -> overrides of configs/default.yaml (model.vocab_size follows the tokenizer)
CANDIDATES = {
    "bytes": ["data.tokenizer=bytes"],
    "bpe:512": ["data.tokenizer=bpe:512"],
    "bpe:1024": ["data.tokenizer=bpe:1024"],
    "bpe:2048": ["data.tokenizer=bpe:2048"],
    "bpe:4096": ["data.tokenizer=bpe:4096"],
    "bpe:1024 s64": ["data.tokenizer=bpe:1024", "model.seq_len=64", "data.batch_size=32"],
    "bpe:2048 d160": ["data.tokenizer=bpe:2048", "model.d_model=160", "model.d_ff=480", "model.n_heads=4"],
}
FINAL = re.compile(r"final held-out bits per byte over all ([\d,]+) held-out bytes: ([\d.]+) "
                   r"\(zlib -9: ([\d.]+), xz -9e: ([\d.]+) on the same bytes\); ([\d,]+) tokens")
PROBE = 30


def measure(name: str, overrides: list[str], budget: float, scratch: str, probe: int = PROBE) -> dict:
    """Probe the candidate cold (fixed cost, step time), then run it cold for about `budget` seconds."""
    from jaxinfra.train.plots import read_metrics
    probe_dir = os.path.join(scratch, "probe")
    shutil.rmtree(probe_dir, ignore_errors=True)
    _, probe_wall = _train([*overrides, *QUIET, f"run.steps={probe}", "run.log_every=1", "run.eval_batches=0",
                            "run.score_heldout=false"], probe_dir, 900)
    timed = [r["step_time_s"] for r in read_metrics(probe_dir) if "step_time_s" in r]
    # every step logged; the first two hold compilation and warm-up, the last is fetched after the final
    # checkpoint's save started (a clean-clone CI probe of 8 steps, timed by that last step, gave fixed < 0)
    step_s = statistics.median(timed[2:-1])
    fixed = probe_wall - probe * step_s
    steps = max(50, int((budget - fixed) / step_s * 0.97) // 10 * 10)  # 3%: the evaluations and final scoring
    run_dir = os.path.join(scratch, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    out, wall = _train([*overrides, *QUIET, f"run.steps={steps}", f"run.eval_every={max(steps // 4, 1)}",
                        f"optim.warmup_steps={max(steps // 30, 10)}"], run_dir, 3600)
    final = FINAL.search(out)
    if final is None:
        raise RuntimeError(f"{name}: no final figure in its output:\n{out[-2000:]}")
    held_bytes, held_tokens = (int(final.group(i).replace(",", "")) for i in (1, 5))
    cache = re.search(r"token cache \S+: [\d,]+ tokens of [\d,]+ bytes in ([\d.]+) s", out)
    trained = re.search(r"trained (bpe:\d+)", out)
    train = [r for r in read_metrics(run_dir) if "tokens_per_sec" in r]
    return {"name": name, "overrides": overrides, "steps": steps, "fixed_s": fixed, "step_s": step_s,
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in train),
            "bytes_per_token": held_bytes / held_tokens, "tokenize_s": float(cache.group(1)) if cache else None,
            "trained_tokenizer": bool(trained), "wall_s": wall, "heldout_bpb": float(final.group(2)),
            "zlib_bpb": float(final.group(3)), "xz_bpb": float(final.group(4))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=540.0, help="wall seconds per candidate, start to finish")
    p.add_argument("--only", nargs="*", default=None, help="candidate names (default: all)")
    from benchmarks import TINY, parse, results_path, write
    args = parse(p, None, only=["bpe:512"], budget=60.0)
    out_path = results_path(args, f"tokenizer-sweep-cpu-{os.cpu_count()}core-{platform.machine()}.json")
    results = json.load(open(out_path)) if os.path.exists(out_path) else {"runs": []}
    scratch = tempfile.mkdtemp(prefix="jaxinfra-tokenizer-sweep-")
    try:
        for name, overrides in CANDIDATES.items():
            if args.only and name not in args.only:
                continue
            smoke = [*TINY, "data.tokenizer_sample=2000000"] if args.smoke else []
            row = {**measure(name, smoke + overrides, args.budget, scratch,
                             probe=8 if args.smoke else PROBE),
                   "budget_s": args.budget, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
            print(f"{name:16s} steps {row['steps']:5d}  {row['tokens_per_sec']:8,.0f} tok/s  "
                  f"{row['bytes_per_token']:.2f} B/tok  fixed {row['fixed_s']:5.1f} s  wall {row['wall_s']:6.1f} s  "
                  f"held-out {row['heldout_bpb']:.3f} bpb (xz {row['xz_bpb']:.3f})", flush=True)
            results["runs"] = [r for r in results["runs"] if (r["name"], r["budget_s"]) != (name, args.budget)] + [row]
            write(out_path, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
