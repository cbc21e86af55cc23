"""What the checkpoint digests cost: save and restore time with and without them.

python benchmarks/checkpoint.py [--rounds R] [--configs default,large] [--smoke]: the default model
and the larger CPU config of benchmarks/run.py on (2,2,2), 8 simulated CPU devices. Each round saves
the same state twice (with and without digests, the order alternating) and restores it twice
(verified, then not); the medians and their ratios are printed and written to
benchmarks/results/checkpoint-<host-kind>.json. Save time is the call plus the wait until the step
is committed (what a run's final save costs); the digests add one device pass over the state.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # only the CPU backend reads it (and the CPU collective flag: jaxinfra/parallel/mesh.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import TINY, host_kind, meta, parse, results_path, write  # noqa: E402
from benchmarks.run import CPU_CONFIGS, lm_plan  # noqa: E402
from jaxinfra.ckpt import manager as ckpt_lib  # noqa: E402
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.parallel.mesh import make_mesh  # noqa: E402
from jaxinfra.settings.loading import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(overrides: list[str], rounds: int) -> dict:
    """Median save and restore seconds with and without digests, for one config on (2,2,2)."""
    cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"), overrides + ["run.steps=1000"])
    mesh = make_mesh(2, 2, 2)
    times: dict[str, list[float]] = {k: [] for k in ("save", "save_plain", "restore", "restore_plain", "digest")}
    with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as tmp:
        plan = lm_plan(cfg, mesh)
        state, _ = plan.init()
        with_d = ckpt_lib.Checkpointer(os.path.join(tmp, "with"), keep=1)
        plain = ckpt_lib.Checkpointer(os.path.join(tmp, "plain"), keep=1, digests=False)
        record = {}
        for r in range(rounds + 1):  # round 0 warms up (compiles the digest pass, creates the managers)
            step = r + 1
            got = {}
            for name in (("save", "save_plain") if r % 2 else ("save_plain", "save")):  # alternate the order
                ckpt = with_d if name == "save" else plain
                got[name] = _timed(lambda: (ckpt.save(step, state, {}), ckpt.wait()))
            record = with_d.meta(step)
            got["restore"] = _timed(lambda: jax.block_until_ready(
                with_d.restore(step, plan.abstract, record[ckpt_reader.DIGESTS])))
            got["restore_plain"] = _timed(lambda: jax.block_until_ready(plain.restore(step, plan.abstract)))
            got["digest"] = _timed(lambda: ckpt_lib.digests_of(state))
            if r:
                for k, v in got.items():
                    times[k].append(v)
        with_d.close()
        plain.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return {"state_mb": n_bytes / 1e6, "median_s": med, "save_ratio": med["save"] / med["save_plain"],
            "restore_ratio": med["restore"] / med["restore_plain"], "rounds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--configs", default="default,large", help="which of default, large")
    args = parse(p, None, rounds=1, configs="default")  # --smoke: and the tiny model
    rows = {}
    for name in args.configs.split(","):
        row = rows[name] = measure(CPU_CONFIGS[name] + (TINY if args.smoke else []), args.rounds)
        m = row["median_s"]
        print(f"{name:8s} state {row['state_mb']:7.1f} MB: save {m['save']:.3f}s vs {m['save_plain']:.3f}s without "
              f"digests ({row['save_ratio']:.3f}x; the digest pass alone {m['digest']:.3f}s), restore "
              f"{m['restore']:.3f}s vs {m['restore_plain']:.3f}s ({row['restore_ratio']:.3f}x)", flush=True)
    write(results_path(args, f"checkpoint-{host_kind()}.json"), {"meta": meta(__file__, None, args), "rows": rows})


if __name__ == "__main__":
    main()
