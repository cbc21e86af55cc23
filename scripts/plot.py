"""A PNG of a run's loss, held-out bits per byte, learning rate and (when pruning) sparsity over the steps:
python scripts/plot.py RUN_DIR [--out PATH]   (default: RUN_DIR/plots.png)"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from jaxinfra.cli import plot_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
