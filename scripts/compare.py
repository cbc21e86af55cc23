"""A dense run beside a pruned one (parameters, nonzeros, dense and sparse file sizes, eval loss, bits per
byte, median step time) and a PNG of both runs' loss and sparsity:
python scripts/compare.py DENSE_RUN PRUNED_RUN [--out compare.png]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from jaxinfra.cli import compare_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
