"""List a run's checkpoint steps and, per tensor, shape, dtype, saved sharding and bytes (no arrays read):
python scripts/inspect_checkpoint.py RUN_OR_CHECKPOINT_DIR [--step N]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from jaxinfra.cli import inspect_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
