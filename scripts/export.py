"""Merge a checkpoint's sharded parameters into whole tensors in one safetensors file.

python scripts/export.py RUN_OR_CHECKPOINT_DIR [--step N] --out model.safetensors [--dtype bf16]
                         [--max-shard-size 5GB] [--force]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxinfra.errors import UserError  # noqa: E402

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; '0' -> no limit."""
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        return int(float(num) * UNITS[unit])
    except (ValueError, KeyError):
        raise UserError(f"--max-shard-size {text}: expected a size such as 500MB or 5GB") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="export.py", description="Merge checkpoint shards into safetensors.")
    p.add_argument("directory", help="a run folder, its checkpoints/ folder, or one step's folder")
    p.add_argument("--step", type=int, default=None, help="default: the newest complete step")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--dtype", default=None, help="cast floating tensors: f32, bf16 or f16 (default: as saved)")
    p.add_argument("--max-shard-size", default="0", help="split into files of at most this size, plus an index")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = p.parse_args(argv)
    try:
        from jaxinfra.export import export
        files = export(args.directory, args.out, step=args.step, dtype=args.dtype,
                       max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f"wrote {f} ({os.path.getsize(f):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
