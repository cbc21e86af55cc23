"""Merge a checkpoint's sharded parameters into whole tensors in safetensors:
python scripts/export.py RUN_OR_CHECKPOINT_DIR [--step N] --out model.safetensors [--dtype bf16] [--sparse] [--quant int8]
                         [--max-shard-size 5GB] [--force]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from jaxinfra.cli import export_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
