"""What a checkpoint on object storage costs: save throughput and the time the loop is blocked, loopback
S3 against the local disk.

python benchmarks/storage.py [--rounds R] [--configs default,large] [--smoke]: the default model and
the larger CPU config of benchmarks/run.py on (2,2,2), 8 simulated CPU devices, saved R times to a
local folder and to s3:// on moto's S3 server, which this script starts on 127.0.0.1 in its own process (so the
server's Python does not share this process's interpreter). Per save: `blocked` is the time the
call takes (what the train loop waits for: the device-to-host copy and the digests; the upload is
asynchronous), `committed` the call plus the wait until the step is committed, throughput the state's
bytes over `committed`; then the restore time. Medians and the s3 / disk ratios are printed and
written to benchmarks/results/storage-<host-kind>.json. moto is a Python server on the same two
cores: these are the costs of the protocol (requests, commit files, no rename), not of a real S3.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import jax

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # only the CPU backend reads it (and the CPU collective flag: jaxinfra/parallel/mesh.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import TINY, host_kind, meta, parse, results_path, write  # noqa: E402
from benchmarks.run import CPU_CONFIGS, lm_plan  # noqa: E402
from jaxinfra.ckpt import manager as ckpt_lib  # noqa: E402
from jaxinfra.core import storage  # noqa: E402
from jaxinfra.parallel.mesh import make_mesh  # noqa: E402
from jaxinfra.settings.loading import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moto_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free 127.0.0.1 port in its own process: (process, endpoint)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # its start-up line is the synchronisation
        if "Running on" in line:
            break
    # then its request log is drained, or the pipe fills and the server stalls mid-upload
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, f"http://127.0.0.1:{port}"


def start_s3() -> tuple[subprocess.Popen, str]:
    """moto_server(), the AWS_* variables pointing at it, and a bucket: (process, bucket URI)."""
    proc, endpoint = moto_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    storage._fs("s3://bench").call_s3("create_bucket", Bucket="bench")
    return proc, "s3://bench"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(overrides: list[str], rounds: int, places: dict[str, str]) -> dict:
    """Median blocked / committed / restore seconds per place, for one config on (2,2,2)."""
    cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"), overrides + ["run.steps=1000"])
    mesh = make_mesh(2, 2, 2)
    out = {}
    with jax.set_mesh(mesh):
        plan = lm_plan(cfg, mesh)
        state, _ = plan.init()
        n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        for name, root in places.items():
            ck = ckpt_lib.Checkpointer(storage.join(root, f"{cfg.model.d_model}", "checkpoints"), keep=2)
            times = {"blocked": [], "committed": [], "restore": []}
            for r in range(rounds + 1):  # round 0 warms up (compiles the digest pass, opens the clients)
                step = r + 1
                t0 = time.perf_counter()
                ck.save(step, state, {"step": step, "data": {"global_batches_consumed": step}})
                blocked = time.perf_counter() - t0
                ck.wait()
                committed = time.perf_counter() - t0
                restore = _timed(lambda: jax.block_until_ready(ckpt_lib.resume(ck, plan.abstract)))
                print(f"  {cfg.model.d_model} {name} round {r}: blocked {blocked:.3f}s, committed {committed:.3f}s, "
                      f"restore {restore:.3f}s", flush=True)
                if r:
                    for k, v in (("blocked", blocked), ("committed", committed), ("restore", restore)):
                        times[k].append(v)
            ck.close()
            med = {k: statistics.median(v) for k, v in times.items()}
            out[name] = {**med, "save_mb_s": n_bytes / 1e6 / med["committed"]}
    return {"state_mb": n_bytes / 1e6, "rounds": rounds, **out,
            "ratio": {k: out["s3"][k] / out["disk"][k] for k in ("blocked", "committed", "restore")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default="default,large", help="which of default, large")
    args = parse(p, None, rounds=1, configs="default")  # --smoke: and the tiny model
    out = results_path(args, f"storage-{host_kind()}.json")
    server, bucket = start_s3()
    rows = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.configs.split(","):
                row = rows[name] = measure(CPU_CONFIGS[name] + (TINY if args.smoke else []), args.rounds,
                                           {"disk": tmp, "s3": f"{bucket}/{name}"})
                d, s, q = row["disk"], row["s3"], row["ratio"]
                print(f"{name:8s} state {row['state_mb']:6.1f} MB | disk: blocked {d['blocked']:.3f}s, committed "
                      f"{d['committed']:.3f}s ({d['save_mb_s']:.0f} MB/s), restore {d['restore']:.3f}s | s3: blocked "
                      f"{s['blocked']:.3f}s ({q['blocked']:.2f}x), committed {s['committed']:.3f}s "
                      f"({s['save_mb_s']:.0f} MB/s, {q['committed']:.2f}x), restore {s['restore']:.3f}s "
                      f"({q['restore']:.2f}x)", flush=True)
    finally:
        server.kill()
        server.wait()
    write(out, {"meta": meta(__file__, None, args, server="moto (python -m moto.server) on 127.0.0.1, its own process"),
                "rows": rows})


if __name__ == "__main__":
    main()
