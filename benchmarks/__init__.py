"""The benchmark scripts (python benchmarks/NAME.py) and what they share: the smoke mode and the results file.

Every script takes --smoke: its real code path on a tiny model, few steps and small sizes, a check that it
still runs (tests/test_benchmarks.py runs each in the slow lane). A smoke run's results go to --out or a
new temporary folder, never to benchmarks/results/, where the recorded figures live. Imports no JAX.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# Widths that compile in a second or two (tests/conftest.py's TINY model, on bytes: 256 ids); later overrides
# win, so these go after a script's own (a tokenizer a script sweeps goes after them)
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.seq_len=16",
        "data.batch_size=16", "data.tokenizer=bytes"]


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None, **smoke: Any) -> argparse.Namespace:
    """Add --smoke and --out to `p` and parse `argv`; under --smoke the keyword values replace the parser's
    defaults (a flag given explicitly still wins)."""
    p.add_argument("--smoke", action="store_true",
                   help="a tiny config and few steps, to check the script runs; results under a temporary "
                        "folder (or --out), never benchmarks/results/")
    p.add_argument("--out", help="results file, or a folder for it (default benchmarks/results/; --smoke: "
                                 "a new temporary folder)")
    args = p.parse_args(argv)
    if args.smoke and smoke:
        p.set_defaults(**smoke)
        args = p.parse_args(argv)
    return args


def results_path(args: argparse.Namespace, name: str) -> str:
    """Where this run's results file `name` goes: --out (a file, or an existing folder to hold `name`), else
    benchmarks/results/ (--smoke: a new temporary folder). A smoke run refuses benchmarks/results/."""
    if args.out:
        out = os.path.join(args.out, name) if os.path.isdir(args.out) or args.out.endswith("/") else args.out
    else:
        out = os.path.join(tempfile.mkdtemp(prefix="jaxinfra-bench-smoke-") if args.smoke else RESULTS, name)
    out = os.path.abspath(out)
    if args.smoke and os.path.commonpath([out, RESULTS]) == RESULTS:
        raise SystemExit(f"--smoke writes no figures into {RESULTS} (--out {args.out})")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return out


def host_kind() -> str:
    """'cpu-2core-x86_64' or 'gpu-nvidia-h100-80gb-hbm3': the results file's name."""
    import platform

    import jax
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu-{os.cpu_count()}core-{platform.machine()}"
    return f"{d.platform}-{d.device_kind}".lower().replace(" ", "-")


def meta(script: str, argv: list[str] | None, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The results file's "meta": the host, JAX's version, the date, the command line, whether a smoke run."""
    import jax
    return {"host_kind": host_kind(), "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), **extra,
            "command": f"python benchmarks/{os.path.basename(script)} "
                       + " ".join(sys.argv[1:] if argv is None else argv), "smoke": args.smoke}


def write(out: str, result: dict[str, Any]) -> None:
    """Write the results JSON and say where."""
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}", flush=True)
