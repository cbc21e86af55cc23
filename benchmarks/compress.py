"""Compression report: size, quality and speed of each way of shrinking a trained model.

python benchmarks/compress.py [--model default wide] [--workdir DIR] [--phase train quality speed] [--smoke]

For each model (the default job's, and the 4.3M-parameter wide model of the pruning benchmark) it
trains four runs with the same data, steps and seed (dense, int8 QAT of weights and matmul inputs,
2:4, 80% magnitude), then for each variant (f32, bf16, int8 PTQ, int8 QAT, 2:4, 80%, 80% + int8,
2:4 + int8) writes the export a user would ship and measures: its file size, held-out loss and bits
per byte over every held-out byte (the weights read back from that file), prefill and decode tokens/s
of the KV-cache decoder on one device, and the decoder's peak memory; plus the QAT step's time
against the dense step's, measured alternately in one process. Writes
benchmarks/results/compress-<host>.json, a markdown table per model, and docs/compression.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import jax

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # only the CPU backend reads it (and the CPU collective flag: jaxinfra/parallel/mesh.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import RESULTS, TINY, host_kind, meta, parse, results_path, write  # noqa: E402
from jaxinfra.settings.loading import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
# (4, 2, 1) for every run: with tensor=2 the 4 heads of wo split 2 per device, and 2:4 groups need 4
MESH = [4, 2, 1]
EXTRA: list[str] = []  # overrides for every run (--steps)
MODELS: dict[str, dict[str, Any]] = {
    # the default job's shape (3,000 steps of batch 16) on bytes, as the report was recorded
    "default": {"overrides": ["data.tokenizer=bytes"], "window": (0.1, 0.6)},
    # the pruning benchmark's wide model (docs/benchmarks.md): 4.3M parameters, 600 steps of batch 32
    "wide": {"overrides": ["data.tokenizer=bytes", "model.d_model=256", "model.d_ff=1024", "run.steps=600",
                           "data.batch_size=32"],
             "window": (0.25, 0.67)},
}
RUNS = {
    "dense": [],
    "qat": ["quant.weights=int8", "quant.activations=int8"],
    "2:4": ["prune.pattern=2:4"],
    "80%": ["prune.sparsity=0.8"],
}
# variant -> (run it comes from, export options)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "f32": ("dense", {}),
    "bf16": ("dense", {"dtype": "bfloat16"}),
    "int8 PTQ": ("dense", {"quant": "int8"}),
    "int8 QAT": ("qat", {"quant": "int8"}),
    "2:4": ("2:4", {"sparse": True}),
    "80%": ("80%", {"sparse": True}),
    "80% + int8": ("80%", {"sparse": True, "quant": "int8"}),
    "2:4 + int8": ("2:4", {"sparse": True, "quant": "int8"}),
}


def run_config(model: str, run: str, workdir: str, extra: list[str] = ()) -> Any:
    """The config of one training run of the report."""
    spec = MODELS[model]
    cfg = load_config(DEFAULT, spec["overrides"] + EXTRA)
    steps = cfg.run.steps
    start, end = round(steps * spec["window"][0]), round(steps * spec["window"][1])
    mesh = [f"mesh.{axis}={n}" for axis, n in zip(("data", "fsdp", "tensor"), MESH)] + ["mesh.cpu_devices=0"]
    common = mesh + spec["overrides"] + EXTRA + [
        f"run.dir={workdir}/{model}/{run.replace(':', '-').replace('%', 'pct')}", "run.progress=false",
        "run.sample_tokens=0", "run.score_heldout=false", "run.eval_every=0", "run.plot=false",
        "checkpoint.every=0", "checkpoint.export_final=false", f"prune.start_step={start}", f"prune.end_step={end}"]
    return load_config(DEFAULT, common + RUNS[run] + list(extra))


def train(model: str, workdir: str, variants: list[str]) -> None:
    """Train (or finish) the runs of `model` that `variants` come from; a finished run is left as it is."""
    from jaxinfra.ckpt import reader as ckpt_reader
    from jaxinfra.lm.job import run
    for name in (name for name in RUNS if any(VARIANTS[v][0] == name for v in variants)):
        cfg = run_config(model, name, workdir)
        try:
            if ckpt_reader.locate(cfg.run.path, None)[1] == cfg.run.steps:
                print(f"## {model} {name}: done already", flush=True)
                continue
        except Exception:  # no checkpoint yet
            pass
        t0 = time.perf_counter()
        final = run(cfg)
        print(f"## {model} {name}: loss {final['loss']:.4f}, {time.perf_counter() - t0:.0f} s", flush=True)


def slug(name: str) -> str:
    """A variant's name as a file name."""
    return name.replace(" + ", "-").replace(" ", "-").replace(":", "-").replace("%", "pct")


def export_variant(model: str, variant: str, workdir: str) -> str:
    """Write the file a user would ship for this variant; returns its path."""
    from jaxinfra.export.writer import export
    from jaxinfra.export.sparse_writer import export_sparse
    run, opts = VARIANTS[variant]
    out = f"{workdir}/{model}/files/{slug(variant)}.safetensors"
    src = run_config(model, run, workdir).run.path
    if opts.get("sparse"):
        export_sparse(src, out, dtype=opts.get("dtype"), force=True, quant=opts.get("quant"))
    else:
        export(src, out, dtype=opts.get("dtype"), force=True, quant=opts.get("quant"))
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """'blocks.0.attn.wq' -> {'blocks': [{'attn': {'wq': ...}}, ...]} (the model's parameter tree, the
    layers of an export a list in order, as the decoder takes unstacked blocks)."""
    out: dict[Any, Any] = {}
    for name, x in flat.items():
        node, parts = out, [int(k) if k.isdigit() else k for k in name.split(".")]
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = x

    def lists(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        return [node[i] for i in range(len(node))] if node and all(isinstance(k, int) for k in node) else node
    return lists(out)


def decoder_params(path: str) -> dict[str, Any]:
    """An export as the decoder takes it: int8 tensors as QTensor(values, scales), the rest as stored."""
    from jaxinfra.compress.quant import QTensor
    from jaxinfra.export.int8 import SCALE
    from jaxinfra.export.safetensors import load
    raw = load(path, dequantize=False)
    flat = {n: QTensor(x, raw[n + SCALE]) if n + SCALE in raw else x for n, x in raw.items()
            if not (n.endswith(SCALE) and n[:-len(SCALE)] in raw)}
    return nest(flat)


def one_device() -> Any:
    from jaxinfra.parallel.mesh import make_mesh
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def quality(cfg: Any, path: str, heldout_tokens: np.ndarray) -> tuple[float, float]:
    """(held-out loss in nats, bits per byte) over every held-out byte, the weights read back from `path`."""
    from jaxinfra.export import safetensors as safetensors_lib
    from jaxinfra.lm import heldout
    from jaxinfra.models.factory import model_fn
    from jaxinfra.parallel import sharding as shd
    from jaxinfra.train.step import abstract_model
    mesh, rules = one_device(), cfg.mesh.logical_rules
    with jax.set_mesh(mesh):
        model = abstract_model(model_fn(cfg, mesh))  # a QAT run's model rounds its matmul inputs, as trained
        params = shd.to_params(safetensors_lib.load(path), model.params, shd.tree_shardings(model.logical, mesh, rules),
                                   stacked=model.stacked)
        bpb = heldout.bits_per_byte(model.eval_def, params, heldout_tokens, cfg.model.seq_len, mesh, rules)
    return bpb * math.log(2), bpb


def speed(cfg: Any, path: str, dtype: str, prompts: list[bytes], n_tokens: int) -> dict[str, float]:
    """Prefill and decode tokens/s of the KV-cache decoder on one device (warm), and its memory; a W8A8
    QAT run decodes as it trained (matmul inputs rounded)."""
    from jaxinfra.models import decode
    mesh, rules = one_device(), cfg.mesh.logical_rules
    params = decoder_params(path)
    kw = dict(temperature=0.0, seed=0, mesh=mesh, rules=rules, dtype=dtype,
              quant_inputs=cfg.quant.activations == "int8")
    times, rows = {}, [list(p) for p in prompts]
    for n in (1, n_tokens):
        decode.generate(params, cfg.model, rows, n_tokens=n, **kw)  # compile, warm
        info = min((decode.generate(params, cfg.model, rows, n_tokens=n, **kw)[1] for _ in range(3)),
                   key=lambda i: i["decode_s"])
        times[n] = info["decode_s"]
    B, Tp = len(prompts), info["prompt_pad"]
    return {"prefill_tokens_per_s": B * Tp / times[1],
            "decode_tokens_per_s": B * (n_tokens - 1) / (times[n_tokens] - times[1]),
            "cache_bytes": info["cache_bytes"], "peak_bytes": info.get("peak_bytes", 0)}


def step_times(model: str, workdir: str, rounds: int = 5, steps: int = 10) -> dict[str, float]:
    """Median ms per step of the dense and the QAT step on the runs' mesh, timed alternately in one process."""
    from benchmarks.run import lm_plan
    from jaxinfra.parallel.mesh import make_mesh
    mesh = make_mesh(*MESH)
    loops, times = {}, {"dense": [], "qat": []}
    with jax.set_mesh(mesh):
        for name in times:
            cfg = run_config(model, name, workdir)
            plan = lm_plan(cfg, mesh)
            tokens = np.random.default_rng(0).integers(0, 256, (cfg.data.batch_size, cfg.model.seq_len + 1),
                                                       dtype=np.int32)
            loops[name] = [plan.compile(), plan.init()[0], {"tokens": jax.device_put(tokens, plan.batch_shardings["tokens"])}]
        for r in range(rounds + 1):  # round 0 warms up
            for name, loop in loops.items():
                step, state, batch = loop
                t0 = time.perf_counter()
                for _ in range(steps):
                    state, _ = step(state, batch)
                jax.block_until_ready(state)
                loop[1] = state
                if r:
                    times[name].append((time.perf_counter() - t0) / steps)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def prompts_of(model: str, workdir: str) -> tuple[Any, list[bytes]]:
    """The held-out bytes, and 8 prompts of 32 held-out bytes for timing the decoder."""
    from jaxinfra.data import corpus as corpus_lib
    from jaxinfra.data import tokenizer as tok_lib
    base = run_config(model, "dense", workdir)
    corpus = corpus_lib.load_corpus(base.data, tok_lib.load("bytes"), os.path.join(workdir, "cache"))
    text = corpus.heldout_text
    return corpus.heldout.tokens, [text[i * 997:i * 997 + 32] for i in range(8)]


def measure_quality(model: str, workdir: str, variants: list[str], result: dict[str, Any]) -> dict[str, Any]:
    """Each variant's file, and its held-out loss and bits per byte read back from that file (into
    `result`, the model's earlier figures, if any)."""
    heldout_tokens, _ = prompts_of(model, workdir)
    rows: dict[str, Any] = result.get("rows", {})
    for variant in variants:
        run = VARIANTS[variant][0]
        t0 = time.perf_counter()
        path = export_variant(model, variant, workdir)
        loss, bpb = quality(run_config(model, run, workdir), path, heldout_tokens)
        rows[variant] = {"file_bytes": os.path.getsize(path), "heldout_loss": loss, "heldout_bpb": bpb}
        print(f"## {model} {variant}: {rows[variant]['file_bytes']:,} bytes, loss {loss:.4f}, bpb {bpb:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = {name: rows[name] for name in VARIANTS if name in rows}  # the table's order
    for row in rows.values():
        row["size_vs_f32"] = row["file_bytes"] / rows["f32"]["file_bytes"]
        row["loss_vs_f32"] = row["heldout_loss"] / rows["f32"]["heldout_loss"]
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(decoder_params(f"{workdir}/{model}/files/f32.safetensors")))
    return {"params": params, "config": MODELS[model]["overrides"], "rows": rows}


def measure_speed(model: str, workdir: str, n_tokens: int, result: dict[str, Any], variants: list[str],
                  rounds: int = 5) -> None:
    """Add the variants' decoder speed and memory, and the QAT step's time, to `result` (a quiet machine)."""
    _, prompts = prompts_of(model, workdir)
    for variant in variants:
        run, opts = VARIANTS[variant]
        cfg = run_config(model, run, workdir)
        path = f"{workdir}/{model}/files/{slug(variant)}.safetensors"
        dtype = "bfloat16" if opts.get("dtype") == "bfloat16" else "float32"
        result["rows"][variant].update(speed(cfg, path, dtype, prompts, n_tokens))
        print(f"## {model} {variant}: decode {result['rows'][variant]['decode_tokens_per_s']:,.0f} tokens/s",
              flush=True)
    result["step_ms"] = step_times(model, workdir, rounds)
    result["qat_step_ratio"] = result["step_ms"]["qat"] / result["step_ms"]["dense"]
    result.update(decode_tokens=n_tokens, prompts=len(prompts))


def table(result: dict[str, Any]) -> str:
    """The markdown table of one model."""
    lines = ["| variant | file | x f32 | held-out loss | x f32 | bits/byte | prefill tok/s | decode tok/s | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        timed = (f"{r['prefill_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.0f} | {r['peak_bytes'] / 2**20:.2f}"
                 if "decode_tokens_per_s" in r else "not timed | not timed | not timed")
        lines.append(f"| {name} | {r['file_bytes'] / 2**20:.2f} MiB | {r['size_vs_f32']:.3f} | {r['heldout_loss']:.4f} | "
                     f"{r['loss_vs_f32']:.4f} | {r['heldout_bpb']:.4f} | {timed} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], out: str) -> None:
    """Held-out bits per byte against file size, one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (model, result) in zip(axes[0], results.items()):
        for name, r in result["rows"].items():
            ax.scatter(r["size_vs_f32"], r["heldout_bpb"])
            ax.annotate(name, (r["size_vs_f32"], r["heldout_bpb"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel("file size / f32 file")
        ax.set_ylabel("held-out bits per byte (all bytes)")
        ax.set_title(f"{model} model ({result['params'] / 1e6:.1f}M parameters)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--workdir", help="the runs and files (default runs/compress; --smoke: beside the results)")
    p.add_argument("--phase", nargs="*", default=["train", "quality", "speed"], choices=["train", "quality", "speed"],
                   help="speed wants a quiet machine; quality and speed add to the results file")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per prompt when timing the decoder")
    p.add_argument("--mesh", nargs=3, type=int, default=MESH, metavar=("DATA", "FSDP", "TENSOR"),
                   help="the runs' mesh (4 2 1; one GPU: 1 1 1)")
    p.add_argument("--steps", type=int, help="train every run this many steps (a shortened check)")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks of 10 steps of the QAT and the dense step")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="measure these (and train the runs they come from; the rest keep their figures)")
    # --smoke: the default job's model at the tiny widths, 20 steps (a mask update every 2); two variants (the
    # dense and the 2:4 run; the plain export and the sparse int8 one), 64 new tokens, 1 timed round
    args = parse(p, argv, model=["default"], steps=20, variants=["f32", "2:4 + int8"], tokens=64, rounds=1)
    MESH[:] = args.mesh
    EXTRA.extend([f"run.steps={args.steps}", "optim.warmup_steps=" + str(max(1, args.steps // 20))] if args.steps else [])
    EXTRA.extend(TINY + ["prune.every=2"] if args.smoke else [])
    out = results_path(args, f"compress-{host_kind()}.json")
    workdir = args.workdir or (os.path.join(os.path.dirname(out), "compress-runs") if args.smoke
                               else os.path.join(ROOT, "runs", "compress"))
    results = json.load(open(out))["models"] if os.path.exists(out) else {}
    for model in args.model:
        if "train" in args.phase:
            train(model, workdir, args.variants)
        if "quality" in args.phase:
            results[model] = measure_quality(model, workdir, args.variants, results.get(model, {}))
        if "speed" in args.phase:
            measure_speed(model, workdir, args.tokens, results[model], args.variants, args.rounds)
            print(f"\n{model} model ({results[model]['params']:,} parameters); QAT step "
                  f"{results[model]['step_ms']['qat']:.1f} ms against dense {results[model]['step_ms']['dense']:.1f} "
                  f"ms ({results[model]['qat_step_ratio']:.3f}x)\n" + table(results[model]), flush=True)
        if not {"quality", "speed"} & set(args.phase):
            continue  # training alone writes no figures
        if os.path.exists(out):  # another model's figures may have been written meanwhile
            results = {**json.load(open(out))["models"], model: results[model]}
        write(out, {"models": results, "meta": meta(__file__, argv, args)})
    if all("decode_tokens" in r for r in results.values()) and results:  # the recorded figures' plot goes to docs/
        plot(results, os.path.join(ROOT, "docs", "compression.png") if os.path.dirname(out) == RESULTS
             else os.path.join(os.path.dirname(out), "compression.png"))


if __name__ == "__main__":
    main()
