"""Command line of the launch script and the tools: parse, validate, set up devices, run; user errors exit 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from jaxinfra.core import storage
from jaxinfra.core.errors import Failed, UserError
from jaxinfra.settings.help import config_help
from jaxinfra.lm.pretrained import with_folder
from jaxinfra.settings.loading import given_keys, load_config, shipped_configs, to_yaml
from jaxinfra.settings.sections import EXPORT_FORMATS, Config


class _TrainParser(argparse.ArgumentParser):
    """train.py's parser; the listing of every config key is built only when --help prints it."""

    def format_help(self) -> str:
        """The options, then every config key with its type, default and meaning."""
        self.epilog = config_help()
        return super().format_help()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--config PATH, key.sub=value overrides and --print-config; --help lists every config key."""
    p = _TrainParser(prog="train.py", description="Train a model on a device mesh.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default",
                   help=f"a YAML file, or a shipped config: {', '.join(shipped_configs())} (default: default)")
    p.add_argument("--print-config", action="store_true",
                   help="print the merged, validated config as YAML and exit, before any device is set up")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. run.steps=20")
    return p.parse_args(argv)


def setup_devices(cfg: Config) -> None:
    """Simulated CPU devices and jax.distributed, both before JAX's backend starts."""
    # JAX only once the config is valid: --help, --print-config and config errors never start it
    from jaxinfra.parallel.mesh import init_distributed, process_count, use_cpu_devices
    d = cfg.distributed
    n_proc, source = process_count(d.num_processes)  # mesh.cpu_devices counts all processes: explicit or srun's
    if cfg.mesh.cpu_devices % n_proc:
        raise UserError(f"mesh.cpu_devices={cfg.mesh.cpu_devices} (all processes together) is not divisible by "
                        f"{source}={n_proc}")
    use_cpu_devices(cfg.mesh.cpu_devices // n_proc)
    init_distributed(d.coordinator, d.num_processes, d.process_id, quiet=True)


def _quiet_closed_loops(unraisable: "sys.UnraisableHookArgs") -> None:
    """Drop the asyncio 'Event loop is closed' noise of a failed async save; report anything else."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
        sys.__unraisablehook__(unraisable)


def _guard(body: Callable[[], int]) -> int:
    """Run a command: a UserError becomes one line on stderr and exit status 2, a Failed run or OSError exit 1."""
    try:
        return body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the disk filled up, a folder went away: name the path and the cause
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/train.py; returns the exit status."""
    args = parse_args(argv)

    def body() -> int:
        cfg = load_config(args.config, args.overrides)
        cfg = with_folder(cfg, given_keys(args.config, args.overrides))  # a model folder's architecture, tokenizer
        if args.print_config:  # before setup_devices: no JAX, no devices, no run folder
            print(to_yaml(cfg), end="")
            return 0
        setup_devices(cfg)
        # Orbax logs a failed background save with its traceback before the run reports it in one line,
        # and its event loop's late callbacks then raise "Event loop is closed" as unraisable exceptions
        for noisy in ("absl", "asyncio"):  # "Task exception was never retrieved" repeats the failed save
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        sys.unraisablehook = _quiet_closed_loops
        # the JAX-heavy modules only after the config is valid (--help and config errors stay instant)
        from jaxinfra.lm.job import run
        run(cfg)
        return 0
    return _guard(body)


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; '0' -> no limit."""
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        return int(float(num) * UNITS[t[len(num):]])
    except (ValueError, KeyError):
        raise UserError(f"--max-shard-size {text}: expected a size such as 500MB or 5GB") from None


def export_main(argv: list[str] | None = None) -> int:
    """jaxinfra-export / scripts/export.py: merge checkpoint shards into safetensors."""
    p = argparse.ArgumentParser(prog="export.py", description="Merge checkpoint shards into safetensors.")
    p.add_argument("directory", help="a run folder, its checkpoints/ folder, or one step's folder")
    p.add_argument("--step", type=int, default=None, help="default: the newest complete step")
    p.add_argument("--out", required=True, help="the .safetensors file to write (--format hf: a folder)")
    p.add_argument("--format", default="safetensors", choices=EXPORT_FORMATS,
                   help="hf: a Hugging Face Llama folder (config.json, model.safetensors, tokenizer) of the default "
                        "Transformer, for transformers and vLLM")
    p.add_argument("--dtype", default=None, help="cast floating tensors: f32, bf16 or f16 (default: as saved)")
    p.add_argument("--max-shard-size", default="0", help="split into files of at most this size, plus an index")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--sparse", action="store_true",
                   help="store pruned tensors compressed (values + bitmask, or N:M values + indices)")
    p.add_argument("--quant", default="none", choices=["none", "int8"],
                   help="int8: matmul weights as int8 with one scale per output channel (compressed-tensors' "
                        "layout; a QAT run's own integers)")
    args = p.parse_args(argv)

    def body() -> int:
        # each command's backend (JAX, Orbax) only once its arguments parsed: --help and usage errors stay instant
        from jaxinfra.export.sparse_writer import export_sparse
        from jaxinfra.export.writer import export, release_freed_tensors
        release_freed_tensors()  # this process only exports: host memory stays near two tensors
        if args.format == "hf":
            if args.sparse:
                raise UserError("--sparse with --format hf: the Hugging Face layout is dense")
            from jaxinfra.hub.hf import export_hf
            for f in export_hf(args.directory, args.out, step=args.step, dtype=args.dtype,
                               max_shard_bytes=parse_size(args.max_shard_size), force=args.force, quant=args.quant):
                print(f"wrote {f} ({storage.size(f):,} bytes)")
            return 0
        if args.sparse:
            if parse_size(args.max_shard_size):
                raise UserError(f"--max-shard-size {args.max_shard_size} with --sparse: a sparse export is one file")
            s = export_sparse(args.directory, args.out, step=args.step, dtype=args.dtype, force=args.force,
                              quant=args.quant)
            packed = sum(e != "dense" for e in s.encodings.values())
            print(f"wrote {args.out} ({s.sparse_bytes:,} bytes; the dense file would be {s.dense_bytes:,} bytes: "
                  f"{s.sparse_bytes / s.dense_bytes:.1%}); {s.nonzeros:,} of {s.params:,} parameters nonzero, "
                  f"{packed} of {len(s.encodings)} tensors compressed")
            return 0
        files = export(args.directory, args.out, step=args.step, dtype=args.dtype,
                       max_shard_bytes=parse_size(args.max_shard_size), force=args.force, quant=args.quant)
        for f in files:
            print(f"wrote {f} ({storage.size(f):,} bytes)")
        return 0
    return _guard(body)


def inspect_main(argv: list[str] | None = None) -> int:
    """jaxinfra-inspect / scripts/inspect_checkpoint.py: steps and tensors of a checkpoint, arrays unread."""
    p = argparse.ArgumentParser(prog="inspect_checkpoint.py",
                                description="List checkpoint steps and, per tensor, shape, dtype, sharding, bytes.")
    p.add_argument("directory")
    p.add_argument("--step", type=int, default=None, help="default: the newest complete step")
    p.add_argument("--verify", action="store_true", help="read every parameter and check it against its digest")
    args = p.parse_args(argv)

    def body() -> int:
        from jaxinfra.ckpt.listing import describe_checkpoint
        print("\n".join(describe_checkpoint(args.directory, args.step, verify=args.verify)))
        return 0
    return _guard(body)


def generate_main(argv: list[str] | None = None) -> int:
    """jaxinfra-generate / scripts/generate.py: text from a trained run's newest checkpoint (KV-cache decoding)."""
    p = argparse.ArgumentParser(prog="generate.py", description="Sample text from a trained run.")
    p.add_argument("run_dir", help="a run folder, a safetensors export of a run (RUN/exports/model-N.safetensors), or a "
                                   "Hugging Face folder (llama, mistral, qwen2, qwen3)")
    p.add_argument("--prompt", action="append", default=None, help="repeatable; default: 'def '")
    p.add_argument("--tokens", type=int, default=200, help="tokens (of the run's tokenizer) to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--step", type=int, default=None, help="default: the newest complete step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def body() -> int:
        if args.tokens < 1 or args.temperature < 0:
            raise UserError(f"--tokens={args.tokens} must be at least 1 and --temperature={args.temperature} "
                            f"not negative")
        from jaxinfra.lm.from_run import generate_from_run
        texts, _, info = generate_from_run(args.run_dir, args.prompt or ["def "], n_tokens=args.tokens,
                                           temperature=args.temperature, seed=args.seed, step=args.step)
        print("\n".join(texts))
        # on stderr: stdout stays the texts alone
        print(f"decoded {len(texts)} x {args.tokens} tokens at {info['tokens_per_s']:,.0f} tokens/s "
              f"({info['compile_s']:.1f}s compiling); KV cache {info['cache_bytes']:,} bytes", file=sys.stderr)
        return 0
    return _guard(body)


def compare_main(argv: list[str] | None = None) -> int:
    """jaxinfra-compare / scripts/compare.py: a dense and a pruned run side by side, and a PNG of both."""
    p = argparse.ArgumentParser(prog="compare.py", description="Compare a dense run with a pruned one: parameters, "
                                "nonzeros, file sizes, eval loss, bits per byte, step time; plot loss and sparsity.")
    p.add_argument("dense_run")
    p.add_argument("pruned_run")
    p.add_argument("--out", default=None, help="the PNG to write (default: PRUNED_RUN/compare.png)")
    args = p.parse_args(argv)

    def body() -> int:
        from jaxinfra.train.compare import compare
        lines, png = compare(args.dense_run, args.pruned_run, args.out)
        print("\n".join(lines))
        print(f"wrote {png}")
        return 0
    return _guard(body)


def plot_main(argv: list[str] | None = None) -> int:
    """jaxinfra-plot / scripts/plot.py: a PNG of a run's loss, bits per byte, learning rate and sparsity."""
    p = argparse.ArgumentParser(prog="plot.py", description="Plot a run's metrics.jsonl into RUN_DIR/plots.png.")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN_DIR/plots.png)")
    args = p.parse_args(argv)

    def body() -> int:
        from jaxinfra.train.plots import plot_run
        print(f"wrote {plot_run(args.run_dir, args.out)}")
        return 0
    return _guard(body)
