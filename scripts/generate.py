"""Sample text from a trained run (or a safetensors export of one), on the devices available, through the run's
tokenizer: python scripts/generate.py RUN_DIR --prompt "def " [--tokens N] [--temperature T] [--step N]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from jaxinfra.cli import generate_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
