"""Train the configured model: python scripts/train.py [--config PATH] [key.sub=value ...]."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from jaxinfra.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
