"""Command line of the launch script: parse, validate, set up devices, run; user errors exit 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jaxinfra.config import Config, load_config
from jaxinfra.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--config PATH and key.sub=value overrides."""
    p = argparse.ArgumentParser(prog="train.py", description="Train a model on a device mesh.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None,
                   help="YAML config (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. run.steps=20")
    return p.parse_args(argv)


def setup_devices(cfg: Config) -> None:
    """Simulated CPU devices and jax.distributed, both before JAX's backend starts."""
    from jaxinfra.mesh import init_distributed, use_cpu_devices
    d = cfg.distributed
    n_proc = max(d.num_processes, 1)
    if cfg.mesh.cpu_devices % n_proc:
        raise UserError(f"mesh.cpu_devices={cfg.mesh.cpu_devices} is not divisible by "
                        f"distributed.num_processes={n_proc}")
    use_cpu_devices(cfg.mesh.cpu_devices // n_proc)
    init_distributed(d.coordinator, d.num_processes, d.process_id)


def main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/train.py; returns the exit status."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        setup_devices(cfg)
        from jaxinfra.job import run  # imports JAX-heavy modules only after the config is valid
        from jaxinfra.train import Diverged
        try:
            run(cfg)
        except Diverged as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
