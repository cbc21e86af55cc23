"""Compression of a pretrained model: prune and quantize a Hugging Face folder, with and without a fine-tune.

python benchmarks/pretrained_compress.py [--workdir DIR] [--base-steps N] [--steps N] [--phase train quality speed]
                                         [--variants ...] [--smoke]

The pretrained model is one trained here: the default job (configs/default.yaml, bpe:1024) exported with
`export.py --format hf`; that folder is what every variant starts from (`checkpoint.init_from=FOLDER`, the HF
reading path: the folder's architecture and tokenizer). Variants, all on the same corpus, steps, learning rate
and seed: the folder as loaded; a dense fine-tune; 50% magnitude pruning one-shot with no fine-tune (one step
at lr 1e-12: the mask, and weights unchanged elsewhere) and one-shot then fine-tuned; 50% gradual (cubic) during
the fine-tune; 2:4 one-shot with no fine-tune and then fine-tuned. Each is exported as a user would (an HF folder,
f32 and `--quant int8`; `--sparse` safetensors for size) and measured: held-out bits per byte over every held-out
byte with the model read back from the HF folder by from_pretrained (int8 dequantized per channel), file
sizes, zeros in the pruned kernels, and decode tokens/s of the KV-cache decoder on one device (greedy, warm; int8
kernels as int8 values and scales). Writes benchmarks/results/pretrained-compress-<host>.json and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax

from jaxinfra.parallel.mesh import use_cpu_devices

use_cpu_devices(8)  # only the CPU backend reads it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import TINY, host_kind, meta, parse, results_path, write
from benchmarks.compress import one_device, speed
from jaxinfra.settings.loading import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
QUIET = ["run.progress=false", "run.sample_tokens=0", "run.plot=false", "checkpoint.every=0"]
# the fine-tunes' mesh: compress.py's (4, 2, 1) (the default (2, 2, 2) prunes 2:4 on this model too)
MESH = ["mesh.data=4", "mesh.fsdp=2", "mesh.tensor=1", "mesh.cpu_devices=0"]
HALF = ["prune.sparsity=0.5"]
# run -> (fine-tuned?, prune keys); "gradual" gets its end step from the fine-tune's length
RUNS: dict[str, tuple[bool, list[str]]] = {
    "dense": (True, []),
    "50% one-shot": (False, HALF + ["prune.schedule=oneshot"]),
    "50% one-shot, fine-tuned": (True, HALF + ["prune.schedule=oneshot"]),
    "50% gradual": (True, HALF + ["prune.schedule=cubic"]),
    "2:4": (False, ["prune.pattern=2:4"]),
    "2:4, fine-tuned": (True, ["prune.pattern=2:4"]),
}
# variant (a row pair of the table: f32 and + int8) -> the run it comes from ("base": the folder itself)
VARIANTS = {
    "dense, as loaded": "base",
    "dense, fine-tuned": "dense",
    "50% one-shot, no fine-tune": "50% one-shot",
    "50% one-shot, then fine-tuned": "50% one-shot, fine-tuned",
    "50% gradual, during the fine-tune": "50% gradual",
    "2:4 one-shot, no fine-tune": "2:4",
    "2:4 one-shot, then fine-tuned": "2:4, fine-tuned",
}
SETTINGS: dict[str, Any] = {}  # base_steps, steps, lr, smoke: set by main


def read_json(path: str) -> dict[str, Any]:
    """A JSON file's contents, {} when there is none."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def slug(name: str) -> str:
    """A run's or variant's name as a file name."""
    return "".join(c if c.isalnum() else "-" for c in name.replace("%", "pct")).strip("-").replace("--", "-")


def base_config(workdir: str) -> Any:
    """The pretrained model's run: the default job (or its tiny smoke version), quiet."""
    extra = TINY + ["optim.warmup_steps=2"] if SETTINGS["smoke"] else []
    steps = [f"run.steps={SETTINGS['base_steps']}"] if SETTINGS["base_steps"] else []
    return load_config(DEFAULT, QUIET + [f"run.dir={workdir}/base", f"data.cache={workdir}/cache"] + extra + steps)


def run_config(run: str, workdir: str) -> Any:
    """One fine-tune (or one-step prune) from the folder, its architecture and tokenizer the folder's."""
    from jaxinfra.lm.pretrained import with_folder
    tuned, keys = RUNS[run]
    steps = SETTINGS["steps"]
    if tuned:
        optim = [f"run.steps={steps}", f"optim.lr={SETTINGS['lr']}", f"optim.warmup_steps={max(1, steps // 10)}"]
    else:  # one step at a learning rate too small to move an f32 weight: the mask alone (kept_as_loaded)
        optim = ["run.steps=1", "optim.lr=1e-12", "optim.warmup_steps=0"]
    prune = ["prune.start_step=0", f"prune.end_step={round(steps * 2 / 3)}"] if keys else []
    smoke = TINY + ["prune.every=2"] if SETTINGS["smoke"] else []  # the folder's model fields win over TINY's
    cfg = load_config(DEFAULT, QUIET + MESH + smoke + [
        f"checkpoint.init_from={workdir}/hf", f"run.dir={workdir}/{slug(run)}", f"data.cache={workdir}/cache",
        "run.eval_every=0", "checkpoint.export_final=false"] + optim + keys + prune)
    return with_folder(cfg)


def done(cfg: Any) -> bool:
    """Whether the run has its last step already."""
    from jaxinfra.ckpt import reader as ckpt_reader
    from jaxinfra.core.errors import UserError
    try:
        return ckpt_reader.locate(cfg.run.path, None)[1] == cfg.run.steps
    except (UserError, OSError):  # no checkpoint yet
        return False


def train_one(name: str, cfg: Any) -> None:
    """Train (or finish) one run; its end-of-run figures go to RUN/bench.json."""
    from jaxinfra.lm.job import run
    if done(cfg):
        print(f"## {name}: done already", flush=True)
        return
    t0 = time.perf_counter()
    final = run(cfg)
    figures = {"train_s": time.perf_counter() - t0, "steps": cfg.run.steps, "loss": final.get("loss"),
               "run_heldout_bpb": final.get("heldout_bpb")}
    with open(os.path.join(cfg.run.path, "bench.json"), "w") as f:
        json.dump(figures, f)
    print(f"## {name}: {figures}", flush=True)


def train(workdir: str, variants: list[str]) -> None:
    """The pretrained model and its folder, then the runs `variants` come from."""
    from jaxinfra.cli import export_main
    base = base_config(workdir)
    train_one("base", base)
    if not os.path.isfile(f"{workdir}/hf/config.json"):
        assert export_main([base.run.path, "--format", "hf", "--out", f"{workdir}/hf", "--force"]) == 0
    for run in dict.fromkeys(VARIANTS[v] for v in variants):
        if run != "base":
            train_one(run, run_config(run, workdir))


def source(variant: str, workdir: str) -> tuple[str, bool]:
    """(the run folder a variant is exported from, whether it was pruned)."""
    run = VARIANTS[variant]
    if run == "base":
        return base_config(workdir).run.path, False
    return run_config(run, workdir).run.path, bool(RUNS[run][1])


def export_files(variant: str, workdir: str) -> dict[str, str]:
    """The files a user would write for this variant, f32 and int8: HF folders (export.py --format hf [--quant
    int8]; the folder itself for the model as loaded) and safetensors (--sparse for a pruned run)."""
    from jaxinfra.cli import export_main
    from jaxinfra.export.sparse_writer import export_sparse
    from jaxinfra.export.writer import export
    src, pruned = source(variant, workdir)
    s = f"{workdir}/files/{slug(variant)}"
    files = {"hf": f"{workdir}/hf" if VARIANTS[variant] == "base" else f"{s}-hf", "hf8": f"{s}-hf8",
             "st": f"{s}.safetensors", "st8": f"{s}-int8.safetensors"}
    for key, quant in (("hf", []), ("hf8", ["--quant", "int8"])):
        if files[key] != f"{workdir}/hf":
            assert export_main([src, "--format", "hf", "--out", files[key], "--force"] + quant) == 0
    for key, quant in (("st", None), ("st8", "int8")):
        (export_sparse if pruned else export)(src, files[key], force=True, quant=quant)
    return files


def zeros(folder: str) -> float:
    """Fraction of exact zeros over the folder's q/k/v/o and MLP projection weights (what prune.* takes)."""
    from jaxinfra.export import safetensors as safetensors_lib
    from jaxinfra.hub import hf
    kernels = [w for n, w in safetensors_lib.load(hf.weights_file(folder)).items() if n.endswith("_proj.weight")]
    return sum(int((w == 0).sum()) for w in kernels) / sum(w.size for w in kernels)


def kept_as_loaded(folder: str, loaded: str) -> bool:
    """Whether every weight the folder's projection kernels kept is the loaded folder's, bit for bit."""
    from jaxinfra.export import safetensors as safetensors_lib
    from jaxinfra.hub import hf
    a, b = (safetensors_lib.load(hf.weights_file(f)) for f in (loaded, folder))
    return all(bool(((b[n] == a[n]) | (b[n] == 0)).all()) for n in a if n.endswith("_proj.weight"))


def folder_quality(folder: str, tokens: np.ndarray, n_bytes: int) -> float:
    """Bits per byte over every held-out byte of the model in an HF folder, built on one device by
    jaxinfra.hub.pretrained.from_pretrained (an int8 folder's weights dequantized per output channel)."""
    from flax import nnx

    from jaxinfra.hub.pretrained import folder_config, from_pretrained
    from jaxinfra.lm import heldout
    mesh, cfg = one_device(), folder_config(folder)
    with jax.set_mesh(mesh):
        model, _ = from_pretrained(folder, mesh=mesh)
        graphdef, state = nnx.split(model)
        return heldout.bits_per_byte(graphdef, state, tokens, cfg.model.seq_len, mesh, cfg.mesh.logical_rules,
                                     n_bytes=n_bytes)


def heldout_of(workdir: str) -> tuple[Any, int, list[list[int]]]:
    """The held-out tokens under the folder's tokenizer, their bytes, and 8 prompts of held-out tokens (16; the
    smoke model: half its window) for timing the decoder."""
    from jaxinfra.data import corpus as corpus_lib
    from jaxinfra.data import tokenizer as tok_lib
    cfg = run_config("dense", workdir)
    held = corpus_lib.load_corpus(cfg.data, tok_lib.load(f"{workdir}/hf"), f"{workdir}/cache").heldout
    n = min(16, cfg.model.seq_len // 2)
    return held.tokens, held.n_bytes, [[int(t) for t in held.tokens[i * 997:i * 997 + n]] for i in range(8)]


def measure_quality(workdir: str, variants: list[str], result: dict[str, Any]) -> dict[str, Any]:
    """Each variant's files, zeros and held-out bits per byte read back from its HF folders (into `result`,
    earlier figures kept)."""
    from jaxinfra.export import safetensors as safetensors_lib
    from jaxinfra.hub import hf
    tokens, n_bytes, _ = heldout_of(workdir)
    rows: dict[str, Any] = result.get("rows", {})
    for variant in variants:
        t0 = time.perf_counter()
        files = export_files(variant, workdir)
        run = VARIANTS[variant]
        path = base_config(workdir).run.path if run == "base" else run_config(run, workdir).run.path
        figures = read_json(os.path.join(path, "bench.json"))
        fine_tune = 0 if run == "base" or not RUNS[run][0] else SETTINGS["steps"]
        shared = {"run": run, "fine_tune_steps": fine_tune, "zeros": zeros(files["hf"]),
                  "train_s": figures.get("train_s"), "safetensors_sparse": source(variant, workdir)[1]}
        if run != "base" and RUNS[run][1] and not RUNS[run][0]:  # pruned, not fine-tuned: the mask alone?
            shared["kept_as_loaded"] = kept_as_loaded(files["hf"], f"{workdir}/hf")
        for name, hf_key, st_key in ((variant, "hf", "st"), (f"{variant} + int8", "hf8", "st8")):
            folder = files[hf_key]
            rows.setdefault(name, {}).update(
                shared, hf_folder=folder, file_bytes=os.path.getsize(os.path.join(folder, "model.safetensors")),
                safetensors_bytes=os.path.getsize(files[st_key]), heldout_bpb=folder_quality(folder, tokens, n_bytes),
                run_heldout_bpb=figures.get("run_heldout_bpb") if hf_key == "hf" else None)
        print(f"## {variant}: {rows[variant]['file_bytes']:,} bytes, zeros {rows[variant]['zeros']:.4f}, bpb "
              f"{rows[variant]['heldout_bpb']:.4f}, int8 {rows[variant + ' + int8']['heldout_bpb']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    order = [n for v in VARIANTS for n in (v, f"{v} + int8")]
    rows = {name: rows[name] for name in order if name in rows}
    params = sum(w.size for w in safetensors_lib.load(hf.weights_file(f"{workdir}/hf")).values())
    return {"rows": rows, "params": int(params), "heldout_bytes": n_bytes, "heldout_tokens": len(tokens)}


def measure_speed(workdir: str, n_tokens: int, result: dict[str, Any], variants: list[str]) -> None:
    """Add each variant's prefill and decode tokens/s to `result` (compress.speed: one device, greedy, warm, best
    of 3; the decoder reads the safetensors export of the same step, int8 kernels as int8 values and scales)."""
    _, _, prompts = heldout_of(workdir)
    cfg = run_config("dense", workdir)
    for variant in variants:
        for name, key in ((variant, "st"), (f"{variant} + int8", "st8")):
            path = f"{workdir}/files/{slug(variant)}{'' if key == 'st' else '-int8'}.safetensors"
            result["rows"][name].update(speed(cfg, path, "float32", prompts, n_tokens))
            print(f"## {name}: decode {result['rows'][name]['decode_tokens_per_s']:,.0f} tokens/s", flush=True)
    result.update(decode_tokens=n_tokens, prompts=len(prompts), prompt_tokens=len(prompts[0]))


def ratios(rows: dict[str, Any]) -> None:
    """Each row's bits per byte over the folder's as loaded, and over the dense fine-tune's (the same steps)."""
    for key, ref in (("bpb_vs_loaded", "dense, as loaded"), ("bpb_vs_dense_fine_tuned", "dense, fine-tuned")):
        for row in rows.values():
            row[key] = row["heldout_bpb"] / rows[ref]["heldout_bpb"] if ref in rows else None


def table(result: dict[str, Any]) -> str:
    """The markdown table."""
    lines = [("| variant | fine-tune steps | zeros in kernels | HF file | sparse file | bits/byte | x as loaded | "
              "x dense fine-tuned | decode tok/s |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        timed = f"{r['decode_tokens_per_s']:,.0f}" if "decode_tokens_per_s" in r else "not timed"
        sparse = f"{r['safetensors_bytes'] / 2**20:.2f} MiB" if r["safetensors_sparse"] else "(dense)"
        ratio = [f"{r[k]:.3f}" if r.get(k) else "-" for k in ("bpb_vs_loaded", "bpb_vs_dense_fine_tuned")]
        lines.append(f"| {name} | {r['fine_tune_steps']} | {r['zeros']:.1%} | {r['file_bytes'] / 2**20:.2f} MiB | "
                     f"{sparse} | {r['heldout_bpb']:.4f} | {ratio[0]} | {ratio[1]} | {timed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="the runs and files (default runs/pretrained-compress; --smoke: beside the "
                                     "results)")
    p.add_argument("--phase", nargs="*", default=["train", "quality", "speed"], choices=["train", "quality", "speed"],
                   help="speed wants a quiet machine; quality and speed add to the results file")
    p.add_argument("--base-steps", type=int, default=0, help="steps of the pretrained model (0: the default job's)")
    p.add_argument("--steps", type=int, default=600, help="steps of each fine-tune (gradual pruning ends at 2/3)")
    p.add_argument("--lr", type=float, default=1e-3, help="the fine-tunes' peak learning rate (warmup: 10%% of steps)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt when timing the decoder")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="measure these (and train the runs they come from; the rest keep their figures)")
    # --smoke: the default job's model at the tiny widths (bytes), 20 steps, then 12-step fine-tunes (a mask
    # update every 2); three variants (the folder as loaded, one-shot 50% with no fine-tune, 2:4 fine-tuned)
    args = parse(p, argv, base_steps=20, steps=12, tokens=16,
                 variants=["dense, as loaded", "50% one-shot, no fine-tune", "2:4 one-shot, then fine-tuned"])
    SETTINGS.update(base_steps=args.base_steps, steps=args.steps, lr=args.lr, smoke=args.smoke)
    out = results_path(args, f"pretrained-compress-{host_kind()}.json")
    workdir = os.path.abspath(args.workdir or (os.path.join(os.path.dirname(out), "pretrained-compress-runs")
                                               if args.smoke else os.path.join(ROOT, "runs", "pretrained-compress")))
    result = read_json(out)
    if "train" in args.phase:
        train(workdir, args.variants)
    if "quality" in args.phase:
        result.update(measure_quality(workdir, args.variants, result))
    if "speed" in args.phase:
        measure_speed(workdir, args.tokens, result, args.variants)
    if not {"quality", "speed"} & set(args.phase):
        return  # training alone writes no figures
    ratios(result["rows"])
    base = read_json(os.path.join(base_config(workdir).run.path, "bench.json"))
    result.update(base={"steps": base["steps"], "train_s": base["train_s"], "run_heldout_bpb": base["run_heldout_bpb"],
                        "config": "configs/default.yaml" + (" (smoke: tiny widths, bytes)" if args.smoke else "")},
                  fine_tune={"steps": args.steps, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
                             "gradual_window": [0, round(args.steps * 2 / 3)], "mesh": MESH[:3]})
    write(out, {**result, "meta": meta(__file__, argv, args, machine="2-core x86_64 CPU, 8 simulated devices"
                                       if host_kind().startswith("cpu") else host_kind())})
    print(table(result), flush=True)


if __name__ == "__main__":
    main()
