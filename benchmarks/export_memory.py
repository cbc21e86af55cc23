"""Host memory of exporting a checkpoint to safetensors: the peak above the interpreter's baseline.

python benchmarks/export_memory.py [--big N] [--big-mib M] [--no-s3] [--keep DIR] [--smoke]: builds a
synthetic checkpoint (by default 15 float32 tensors of 16 MiB, half their entries zero, plus small ones: about
258 MB) with a Checkpointer on one CPU device, then exports it dense (export.export) and sparse
(sparse_writer.export_sparse) to a local file and to s3:// on a moto server started here (its own process,
so its memory is not counted). Each measurement runs in a fresh interpreter: it imports jaxinfra.export.writer
(and, for s3://, opens the store client), reads its resident memory as the baseline, resets the peak
(`echo 5 > /proc/self/clear_refs`, which sets VmHWM to the current VmRSS; where that is refused, the
peak is ru_maxrss, which includes the imports), exports, and reports VmHWM - baseline in MB and as a
multiple of the largest tensor. "cold" rows take the baseline right after the imports, so the peak
includes the libraries' one-time set-up (JAX's CPU backend, TensorStore's runtime, Orbax's metadata:
about 10 MB, whatever the model); "warm" rows read the smallest tensor once before the baseline, as a
training process that exports has already done. Each then checks the export equals the checkpoint bit
for bit (safetensors_lib.load against checkpoint.read_params). Printed and written to
benchmarks/results/export-memory-<host-kind>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import parse  # noqa: E402 (imports no JAX: a child's baseline is taken after its own imports)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "export-memory"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1))


def _reset_peak() -> bool:
    """Set this process's VmHWM to its current VmRSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 1024  # within a MiB: the reset took
    except OSError:
        return False


def build(run_dir: str, big: int, big_mib: int, seed: int = 0) -> dict:
    """A checkpoint step 1 of `big` square float32 tensors of big_mib MiB (half zeros) plus small ones."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfra.ckpt.manager import Checkpointer
    from jaxinfra.core.state import TrainState
    side = int((big_mib * 2**20 // 4) ** 0.5)
    rng = np.random.default_rng(seed)
    params: dict = {"bias": {}, "layers": {}}  # the large tensors one after another, as a model's are
    for i in range(big):
        w = rng.standard_normal((side, side), dtype=np.float32)
        w[rng.random((side, side)) < 0.5] = 0  # unstructured 50%: the sparse export stores a bitmask
        params["layers"][f"{i:03d}"] = jnp.asarray(w)
        params["bias"][f"{i:03d}"] = jnp.asarray(rng.standard_normal(side, dtype=np.float32))
        del w
    for i in range(6):  # 1 MiB each
        params[f"proj{i}"] = jnp.asarray(rng.standard_normal((side, 2**18 // side), dtype=np.float32))
    params["scale"] = jnp.float32(1.5)
    ck = Checkpointer(run_dir)
    step = 1
    ck.save(step, TrainState(step=jnp.int32(step), params=params, opt_state={}),
            {"step": step, "data": {"global_batches_consumed": step}})
    ck.wait()
    ck.close()
    leaves = jax.tree.leaves(params)
    return {"tensors": len(leaves), "model_mb": sum(x.nbytes for x in leaves) / 1e6,
            "largest_tensor_mb": max(x.nbytes for x in leaves) / 1e6}


def child(kind: str, run_dir: str, dest: str, warm: str) -> None:
    """One measurement in this (fresh) interpreter: prints one JSON line. warm="warm": the libraries'
    one-time set-up (JAX's CPU backend, TensorStore's runtime, Orbax's metadata read) is done before the
    baseline, by reading the smallest tensor once, as it is in a training process that exports."""
    import numpy as np

    from jaxinfra.ckpt import reader as ckpt_reader
    from jaxinfra.core import storage
    from jaxinfra.export import writer as export
    from jaxinfra.export import sparse_writer
    from jaxinfra.export import safetensors as safetensors_lib
    export.release_freed_tensors()  # as scripts/export.py does
    warm_mb = 0.0
    if warm == "warm":
        before = _status_kb("VmRSS")
        saved = ckpt_reader.SavedParams(ckpt_reader.locate(run_dir)[0])
        saved.read(min(saved.entries, key=lambda n: math.prod(saved.entries[n][2].shape)))
        del saved
        warm_mb = (_status_kb("VmRSS") - before) / 1024 * 1.048576
    if storage.is_remote(dest):  # the store client (botocore's service models) is a fixed cost, set up first
        before = _status_kb("VmRSS")
        storage._fs(dest).ls(BUCKET)
        client_mb = (_status_kb("VmRSS") - before) / 1024 * 1.048576
    else:
        client_mb = 0.0
    base = _status_kb("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    if kind == "dense":
        export.export(run_dir, dest)
    else:
        sparse_writer.export_sparse(run_dir, dest)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = safetensors_lib.load(dest)
    want, _ = ckpt_reader.read_params(run_dir)
    equal = set(got) == set(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        and np.ascontiguousarray(got[k]).tobytes() == np.ascontiguousarray(want[k]).tobytes() for k in want)
    print(json.dumps({"peak_above_baseline_mb": (peak - base) * 1024 / 1e6, "baseline_mb": base * 1024 / 1e6,
                      "peak_reset": reset, "client_setup_mb": client_mb, "library_setup_mb": warm_mb,
                      "seconds": seconds,
                      "bitwise_equal": equal, "file_mb": _size(dest) / 1e6}), flush=True)


def _size(path: str) -> int:
    from jaxinfra.core import storage
    return storage.size(path)


def measure(kind: str, run_dir: str, dest: str, env: dict, warm: bool) -> dict:
    """One export in a fresh interpreter (so that no peak is another's)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, run_dir, dest,
                          "warm" if warm else "cold"],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{kind} export to {dest} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", type=int, default=15, help="how many large tensors")
    p.add_argument("--big-mib", type=int, default=16, help="MiB of each large tensor")
    p.add_argument("--no-s3", action="store_true", help="local file only (no moto server)")
    p.add_argument("--keep", default=None, help="build the checkpoint in this folder and keep it")
    p.add_argument("--child", nargs=4, metavar=("KIND", "RUN_DIR", "DEST", "WARM"), help=argparse.SUPPRESS)
    args = parse(p, None, big=2, big_mib=1)  # --smoke: 2 tensors of 1 MiB
    if args.child:
        child(*args.child)
        return
    from benchmarks import host_kind, meta, results_path, write
    from benchmarks.storage import moto_server
    out = results_path(args, f"export-memory-{host_kind()}.json")
    tmp = tempfile.mkdtemp(prefix="jaxinfra-export-memory-")
    run_dir = args.keep or os.path.join(tmp, "run")
    server = None
    try:
        model = build(os.path.join(run_dir, "checkpoints"), args.big, args.big_mib)
        print(f"checkpoint {run_dir}: {model['tensors']} tensors, {model['model_mb']:.1f} MB, "
              f"largest {model['largest_tensor_mb']:.1f} MB", flush=True)
        dests = {"disk": (os.path.join(tmp, "out"), dict(os.environ))}
        if not args.no_s3:
            server, endpoint = moto_server()
            env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, **AWS)
            subprocess.run([sys.executable, "-c", f"from jaxinfra.core import storage; storage._fs('s3://{BUCKET}').call_s3("
                            f"'create_bucket', Bucket='{BUCKET}')"], env=env, check=True, cwd=ROOT)
            dests["s3"] = (f"s3://{BUCKET}/{os.getpid()}", env)
        rows = {}
        for kind in ("dense", "sparse"):
            for where, (prefix, env) in dests.items():
                for warm in (False, True):
                    name = f"{kind}/{where}/{'warm' if warm else 'cold'}"
                    dest = f"{prefix}/model-{kind}-{'warm' if warm else 'cold'}.safetensors"
                    row = rows[name] = measure(kind, run_dir, dest, env, warm)
                    row["x_largest_tensor"] = row["peak_above_baseline_mb"] / model["largest_tensor_mb"]
                    print(f"{name:17s}: peak {row['peak_above_baseline_mb']:6.1f} MB above baseline "
                          f"({row['x_largest_tensor']:.2f}x the largest tensor), {row['seconds']:.1f}s, "
                          f"file {row['file_mb']:.1f} MB, bitwise equal: {row['bitwise_equal']}", flush=True)
                    if not row["bitwise_equal"]:
                        raise SystemExit(f"{name}: the export differs from the checkpoint")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    write(out, {"meta": meta(__file__, None, args), "model": model, "rows": rows})


if __name__ == "__main__":
    main()
