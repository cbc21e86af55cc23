"""Train a small MLP classifier, your own model and data, through jaxinfra on a (2, 2, 2) mesh.

The model names its own logical axes (features, hidden, classes); the config's mesh.rules map them
onto mesh axes. Data are Gaussian blobs generated here (no download). Optax AdamW from the
config, magnitude pruning to 50% (prune.*), checkpoints every 20 steps; prints held-out accuracy.

    python examples/mlp_classifier.py [--steps N] [--dir RUN_DIR] [key.sub=value ...]

Run it again on the same --dir with a larger --steps and it resumes from the newest checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

import jaxinfra  # noqa: E402  (imports nothing heavy yet: devices can still be chosen)

FEATURES, HIDDEN, CLASSES = 32, 64, 8
RULES = {"features": ["fsdp"], "hidden": ["tensor"], "classes": [], "batch": ["data", "fsdp"]}


class Blobs:
    """Random-access source: example i = {"x": float32 (FEATURES,), "y": int32 label}, fixed by the seed."""

    def __init__(self, n: int, seed: int):
        centers = np.random.default_rng(1234).normal(0.0, 1.0, (CLASSES, FEATURES))  # the task, shared by splits
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, CLASSES, n).astype(np.int32)
        self.x = (centers[self.y] + rng.normal(0.0, 1.0, (n, FEATURES))).astype(np.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"x": self.x[i], "y": self.y[i]}


def make_model(seed: int) -> Any:
    """features -> hidden (ReLU) -> classes, every parameter annotated with logical axis names."""
    from flax import nnx

    init, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(FEATURES, HIDDEN, rngs=rngs,
                                     kernel_init=nnx.with_partitioning(init, ("features", "hidden")),
                                     bias_init=nnx.with_partitioning(zeros, ("hidden",)))
            self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs,
                                  kernel_init=nnx.with_partitioning(init, ("hidden", "classes")),
                                  bias_init=nnx.with_partitioning(zeros, ("classes",)))

        def __call__(self, x: Any) -> Any:
            return self.out(nnx.relu(self.hidden(x)))

    return MLP(nnx.Rngs(seed))


def loss_fn(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy of the labels."""
    import optax
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


def eval_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss and accuracy of one batch."""
    import jax.numpy as jnp
    import optax
    logits = model(batch["x"])
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(),
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, print the held-out accuracy; a user error prints one line, exit 2."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dir", default="runs/mlp_classifier")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    rules = [f"mesh.rules.{name}={axes}" for name, axes in RULES.items()]
    try:
        cfg = jaxinfra.load_config(None, [
            *rules, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"run.steps={args.steps}", f"run.dir={args.dir}",
            "run.log_every=10", "run.eval_every=50", "run.eval_batches=4", "run.progress=false",
            "data.batch_size=64", "optim.lr=3e-3", "optim.warmup_steps=5", "optim.weight_decay=0.0",
            "prune.sparsity=0.5", f"prune.start_step={args.steps // 5}", f"prune.end_step={args.steps * 3 // 5}",
            f"prune.every={max(args.steps // 20, 1)}", "checkpoint.every=20", *args.overrides])
        jaxinfra.setup_devices(cfg)  # 8 simulated CPU devices (and jax.distributed when distributed.* is set)
        result = jaxinfra.train_model(cfg, lambda: make_model(cfg.run.seed), loss_fn, Blobs(4096, seed=0),
                                      Blobs(256, seed=1), options=jaxinfra.TrainOptions(eval_fn=eval_fn))
    except jaxinfra.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "stopped_at" not in result:
        print(f"held-out accuracy {result['eval_accuracy']:.3f}, loss {result['eval_loss']:.3f} "
              f"after {result['step']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
