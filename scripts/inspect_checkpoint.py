"""List a run's checkpoint steps and, per tensor, shape, dtype, saved sharding and bytes (no arrays read).

python scripts/inspect_checkpoint.py RUN_OR_CHECKPOINT_DIR [--step N]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxinfra.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="inspect_checkpoint.py", description=__doc__.splitlines()[0])
    p.add_argument("directory")
    p.add_argument("--step", type=int, default=None, help="default: the newest complete step")
    args = p.parse_args(argv)
    try:
        from jaxinfra.inspect import describe_checkpoint
        print("\n".join(describe_checkpoint(args.directory, args.step)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
