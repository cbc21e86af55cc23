"""What the text pipeline costs: tokenizing into the cache against the `tokenizers` library alone, reading the
cache against what the train step consumes, and the share of a step spent fetching its batch.

python benchmarks/data.py [--tokenizer bpe:1024] [--rounds R]: on the default corpus (this interpreter's standard
library), (1) tokens/s of `cache.build` (list the files, read them, split, encode, write the token files)
against `Tokenizer.encode_batch` of `tokenizers` on the same documents already in memory as str (ratio, goal
>= 0.8); (2) tokens/s of the trainer's loader over the cache (train_batches + global_batches onto the default
2x2x2 mesh, as the trainer reads it) against the default job's training tokens/s from a 30-step run of
scripts/train.py (goal >= 100x); (3) the loader's time per batch over the step time: an upper bound on the
share of a step that waits for data, since the loader's threads prefetch while the step runs (goal < 2%).
Rows go to benchmarks/results/data-<host-kind>.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import TINY, meta, parse, results_path, write  # noqa: E402
from jaxinfra.data import cache as cache_lib  # noqa: E402
from jaxinfra.data import corpus as corpus_lib  # noqa: E402
from jaxinfra.data import packing  # noqa: E402
from jaxinfra.data import sources as data_lib  # noqa: E402
from jaxinfra.data import tokenizer as tok_lib  # noqa: E402
from jaxinfra.parallel import sharding as shd  # noqa: E402
from jaxinfra.parallel.mesh import make_mesh  # noqa: E402
from jaxinfra.settings.loading import load_config  # noqa: E402
from jaxinfra.train.plots import read_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tokenizing(data, tokenizer: tok_lib.Tokenizer, scratch: str, rounds: int) -> dict:
    """Median tokens/s of cache.build (cold each round) and of tokenizers' encode_batch on the same text."""
    _, plan = corpus_lib.plan_of(data)
    texts = [raw.decode("utf-8", errors="replace") for _, _, raw in cache_lib.split_documents(plan)]
    ours, theirs, n_tokens = [], [], 0
    for r in range(rounds):
        root = os.path.join(scratch, f"cache{r}")
        t0 = time.perf_counter()
        built = cache_lib.build(plan, tokenizer, root)
        ours.append(time.perf_counter() - t0)
        n_tokens = built.meta["train"]["tokens"] + built.meta["heldout"]["tokens"]
        shutil.rmtree(root)
        if tokenizer.impl is not None:
            t0 = time.perf_counter()
            tokenizer.impl.encode_batch(texts, add_special_tokens=False)
            theirs.append(time.perf_counter() - t0)
    n_bytes = sum(len(t.encode()) for t in texts)
    row = {"tokenizer": tokenizer.name, "documents": len(texts), "bytes": n_bytes, "tokens": n_tokens,
           "cache_tokens_per_sec": n_tokens / statistics.median(ours), "cache_s": statistics.median(ours)}
    if theirs:  # the end-of-text tokens are ours alone: count theirs without them
        row.update(encode_batch_tokens_per_sec=(n_tokens - len(texts)) / statistics.median(theirs),
                   encode_batch_s=statistics.median(theirs))
        row["ratio"] = row["cache_tokens_per_sec"] / row["encode_batch_tokens_per_sec"]
    return row


def reading(cfg, tokenizer: tok_lib.Tokenizer, scratch: str, batches: int) -> dict:
    """Tokens/s and seconds per global batch of the trainer's loader over the cache, onto the 2x2x2 mesh."""
    corpus = corpus_lib.load_corpus(cfg.data, tokenizer, os.path.join(scratch, "cache"))
    L, B = cfg.model.seq_len, cfg.data.batch_size
    docs = cfg.data.packing == "documents"
    source = packing.Windows(corpus.train.tokens, L, "train", corpus.train.starts if docs else None)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    sharding = shd.named(mesh, ("batch", "seq"), cfg.mesh.logical_rules)
    loader = data_lib.global_batches(iter(data_lib.train_batches(source, B, cfg.run.seed)), sharding)
    next(loader)  # the threads started
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    batch["tokens"].block_until_ready()
    per_batch = (time.perf_counter() - t0) / batches
    return {"batch_s": per_batch, "read_tokens_per_sec": B * L / per_batch, "batches": batches}


def training(overrides: list[str], scratch: str, steps: int) -> dict:
    """The default job's median training tokens/s and step time over a short run of scripts/train.py."""
    run_dir = os.path.join(scratch, "run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *overrides,
                           f"run.steps={steps}", "run.log_every=5", "run.eval_batches=0", "run.progress=false",
                           "run.plot=false", "run.sample_tokens=0", "checkpoint.export_final=false",
                           f"run.dir={run_dir}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    rows = [r for r in read_metrics(run_dir)[1:] if "tokens_per_sec" in r]
    return {"train_tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rows),
            "step_s": statistics.median(r["step_time_s"] for r in rows)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="", help="data.tokenizer (default: configs/default.yaml's)")
    p.add_argument("--rounds", type=int, default=3, help="cold cache builds (medians)")
    p.add_argument("--steps", type=int, default=30, help="steps of the training run that times the step")
    args = parse(p, argv, rounds=1, steps=10)
    small = [f"data.path={os.path.join(ROOT, 'jaxinfra')}", "data.heldout_percent=10"] if args.smoke else []
    overrides = [*small, *(TINY if args.smoke else []),
                 *([f"data.tokenizer={args.tokenizer}"] if args.tokenizer else [])]
    cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"), overrides)
    scratch = tempfile.mkdtemp(prefix="jaxinfra-data-bench-")
    try:
        _, plan = corpus_lib.plan_of(cfg.data)
        size = tok_lib.bpe_size(cfg.data.tokenizer)
        tokenizer = tok_lib.train_bpe(corpus_lib.bpe_sample(plan, cfg.data.tokenizer_sample), size) if size \
            else tok_lib.load(cfg.data.tokenizer)
        row = tokenizing(cfg.data, tokenizer, scratch, args.rounds)
        row.update(reading(cfg, tokenizer, scratch, 20 if args.smoke else 200))
        row.update(training(["--config", "default", *overrides], scratch, args.steps))
        row["read_over_train"] = row["read_tokens_per_sec"] / row["train_tokens_per_sec"]
        row["wait_fraction_bound"] = row["batch_s"] / row["step_s"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{row['tokenizer']}: cache {row['cache_tokens_per_sec']:,.0f} tok/s"
          + (f" vs encode_batch {row['encode_batch_tokens_per_sec']:,.0f} (x{row['ratio']:.2f})" if "ratio" in row
             else "")
          + f"; reading {row['read_tokens_per_sec']:,.0f} tok/s = {row['read_over_train']:,.0f}x the step's "
          f"{row['train_tokens_per_sec']:,.0f}; a batch {1e3 * row['batch_s']:.2f} ms of a {1e3 * row['step_s']:.0f} "
          f"ms step ({100 * row['wait_fraction_bound']:.2f}%)", flush=True)
    result = {"meta": meta(__file__, argv, args), "rows": [row]}
    write(results_path(args, "data.json" if args.smoke else f"data-{result['meta']['host_kind']}.json"), result)
    return result


if __name__ == "__main__":
    main()
