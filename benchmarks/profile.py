"""Where a train step's time goes: a jax.profiler trace of a few steps, summed by XLA op.

python benchmarks/profile.py [--set key=value ...] [--steps N] [--smoke]
Default: the larger CPU config of benchmarks/run.py on one device. Prints each op family's share
(matmuls: dot and YNNPACK/oneDNN fusions; copies and transposes; elementwise fusions) and the
costliest single ops with the JAX operation they came from; writes them to
benchmarks/results/profile-<host-kind>.json (--smoke: the tiny model, one step, a temporary folder).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # only the CPU backend reads it (and the CPU collective flag: jaxinfra/parallel/mesh.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import TINY, host_kind, meta, parse, results_path, write  # noqa: E402
from benchmarks.run import LARGE, lm_plan  # noqa: E402
from jaxinfra.parallel.mesh import make_mesh  # noqa: E402
from jaxinfra.settings.loading import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def family(op: str) -> str:
    """Group an XLA op name: 'ynn_fusion.93' -> matmul, 'copy_bitcast_fusion.2' -> copy/transpose."""
    base = op.rsplit(".", 1)[0] if op.rsplit(".", 1)[-1].isdigit() else op
    if base in ("dot", "ynn_fusion", "onednn_fusion", "custom-call", "cublas-gemm") or "gemm" in base:
        return "matmul"
    if "copy" in base or "transpose" in base:
        return "copy/transpose"
    return "elementwise and other fusions"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", nargs="*", default=LARGE, metavar="key=value")
    p.add_argument("--steps", type=int, default=2)
    args = parse(p, None, set=TINY, steps=1)
    cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"), list(args.set) + ["run.steps=1000"])
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    B, L = cfg.data.batch_size, cfg.model.seq_len
    with jax.set_mesh(mesh):
        plan = lm_plan(cfg, mesh)
        step = plan.compile()
        tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, L + 1), dtype=np.int32)
        batch = {"tokens": jax.device_put(tokens, plan.batch_shardings["tokens"])}
        state, _ = step(plan.init()[0], batch)
        jax.block_until_ready(state)
        with tempfile.TemporaryDirectory() as tmp:
            jax.profiler.start_trace(tmp, create_perfetto_trace=True)
            for _ in range(args.steps):
                state, _ = step(state, batch)
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            trace = json.load(gzip.open(glob.glob(os.path.join(tmp, "**", "*.json.gz"), recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op: collections.Counter = collections.Counter()
    for e in events:  # XLA ops are the complete events whose names are HLO instruction names
        if e.get("ph") == "X" and re.fullmatch(r"[a-z][\w\-]*(\.\d+)?", e["name"]):
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / args.steps
    total = sum(per_op.values())
    by_family: collections.Counter = collections.Counter()
    for op, ms in per_op.items():
        by_family[family(op)] += ms
    print(f"{jax.devices()[0].device_kind}: {total:.0f} ms of XLA ops per step "
          f"(d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, seq {L}, batch {B})")
    for name, ms in by_family.most_common():
        print(f"  {name:32s} {ms:8.1f} ms  {ms / total:6.1%}")
    hlo = step.as_text()
    print("costliest ops:")
    costliest = []
    for op, ms in per_op.most_common(8):
        m = re.search(rf"%{re.escape(op)} = .*?op_name=\"([^\"]+)\"", hlo)
        costliest.append({"op": op, "ms": ms, "source": m.group(1) if m else ""})
        print(f"  {op:28s} {ms:8.1f} ms  {m.group(1)[:70] if m else ''}")
    write(results_path(args, f"profile-{host_kind()}.json"), {
        "meta": meta(__file__, None, args, device_kind=jax.devices()[0].device_kind, steps=args.steps,
                     model={k: getattr(cfg.model, k) for k in ("d_model", "n_layers", "seq_len")}, batch_size=B),
        "step_ms": total, "families": dict(by_family.most_common()), "costliest": costliest})


if __name__ == "__main__":
    main()
