"""Decoding speed: the KV-cache decoder (jaxinfra/models/decode.py) against the sliding-window sampler
(sampling.sample, a full forward pass over seq_len and a host round trip per token).

python benchmarks/decode.py [--tokens 200] [--rounds 3] [--smoke]
The default model (configs/default.yaml, random weights: speed only), 200 new tokens after a short
prompt, greedy, batch 1 and 8, on the default (2,2,2) mesh of 8 simulated CPU devices and on one
device. Both warm and in one process, alternating. The sampler compiles its step inside every call, so
its time is that of a call of N + 1 tokens less one of 1 token: N tokens at its steady pace. Writes
benchmarks/results/decode-<host>.json. The ratio is the claim (the goal: at least 10x on this CPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import jax

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # only the CPU backend reads it (and the CPU collective flag: jaxinfra/parallel/mesh.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import TINY, host_kind, meta, parse, results_path, write  # noqa: E402
from benchmarks.run import lm_plan  # noqa: E402
from jaxinfra.data.tokenizer import bytes_tokenizer  # noqa: E402
from jaxinfra.models import (
    decode,  # noqa: E402
    sampling,
)
from jaxinfra.parallel.mesh import make_mesh  # noqa: E402
from jaxinfra.settings.loading import load_config  # noqa: E402

PROMPTS = ["def ", "import os\n", "class A:", "    return ", "# ", "for i in ", "x = [", "if __name__"]


def measure(shape: tuple[int, int, int], batch: int, tokens: int, rounds: int,
            overrides: list[str] = ()) -> dict[str, Any]:
    """Tokens/s of the sampler and of the decoder for `batch` prompts on a mesh of `shape`."""
    cfg = load_config(None, ["run.steps=1000", *overrides])
    n = shape[0] * shape[1] * shape[2]
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    rules = cfg.mesh.logical_rules
    prompts = PROMPTS[:batch]
    with jax.set_mesh(mesh):
        plan = lm_plan(cfg, mesh)
        params, graphdef = plan.init()[0].params, plan.graphdef  # random weights, born on their shardings
    kw = dict(seq_len=cfg.model.seq_len, tokenizer=bytes_tokenizer(), temperature=0.0, seed=0, mesh=mesh,
              rules=rules)

    def sampler(k: int) -> float:
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            sampling.sample(graphdef, params, prompts, n_tokens=k, **kw)
        return time.perf_counter() - t0

    def decoder() -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        _, info = decode.generate(params, cfg.model, prompts, n_tokens=tokens, temperature=0.0, seed=0, mesh=mesh,
                                  rules=rules, tokenizer=bytes_tokenizer())
        return time.perf_counter() - t0, info

    _, first = decoder()  # compiles
    sample_s, decode_s = [], []
    for _ in range(rounds):
        sample_s.append(sampler(tokens + 1) - sampler(1))
        decode_s.append(decoder()[0])
    s, d = statistics.median(sample_s), statistics.median(decode_s)
    return {"layout": "x".join(map(str, shape)), "batch": batch, "tokens": tokens,
            "sample_tokens_per_s": batch * tokens / s, "decode_tokens_per_s": batch * tokens / d,
            "ratio": s / d, "sample_s": sample_s, "decode_s": decode_s, "decode_compile_s": first["compile_s"],
            "cache_bytes": first["cache_bytes"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every (layout, batch), print a table, write the JSON; returns the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=200, help="new tokens per prompt")
    p.add_argument("--rounds", type=int, default=3, help="timed calls of each, alternating (medians)")
    p.add_argument("--layouts", default="2x2x2,1x1x1", help="comma-separated data x fsdp x tensor shapes")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (at most 8)")
    args = parse(p, argv, tokens=4, rounds=1, batches="2")  # --smoke: and the tiny model
    print(f"{'layout':7s} {'batch':>5s} {'sampler tok/s':>13s} {'decoder tok/s':>13s} {'ratio':>7s} "
          f"{'compile s':>9s} {'cache bytes':>11s}", flush=True)
    rows, load_before = [], os.getloadavg()[0]  # this CPU may be shared: say how busy it was
    for layout in args.layouts.split(","):
        shape = tuple(int(n) for n in layout.split("x"))
        for batch in (int(b) for b in args.batches.split(",")):
            r = measure(shape, batch, args.tokens, args.rounds, TINY if args.smoke else [])  # type: ignore[arg-type]
            rows.append(r)
            print(f"{r['layout']:7s} {batch:5d} {r['sample_tokens_per_s']:13.1f} {r['decode_tokens_per_s']:13.1f} "
                  f"{r['ratio']:6.1f}x {r['decode_compile_s']:9.2f} {r['cache_bytes']:11,d}", flush=True)
    result = {"rows": rows, "meta": meta(__file__, argv, args, load_avg_1m=[load_before, os.getloadavg()[0]])}
    write(results_path(args, f"decode-{host_kind()}.json"), result)
    return result


if __name__ == "__main__":
    main()
