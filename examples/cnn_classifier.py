"""Train a CNN with BatchNorm and Dropout, as the Flax docs write one, through jaxinfra on a (2, 2, 2) mesh.

The model is the Flax NNX MNIST tutorial's CNN, smaller, on generated 12x12 images (no download):
conv -> BatchNorm -> ReLU -> pool, twice, then Linear -> Dropout -> Linear. Its batch statistics
ride in the train state (updated in train mode, used in eval mode, checkpointed, exported); its
Dropout draws from a stream jaxinfra reseeds every step from (run.seed, step). The loss returns
accuracy beside it, logged to metrics.jsonl. 2:4 pruning runs along each kernel's input features
(the input channels of conv2); the first conv (1 input channel) stays dense via prune.exclude, the
output layer by default.

    python examples/cnn_classifier.py [--steps N] [--dir RUN_DIR] [key.sub=value ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

import jaxinfra  # noqa: E402  (imports nothing heavy yet: devices can still be chosen)

SIZE, CLASSES = 12, 10
RULES = {"batch": ["data", "fsdp"], "channels": ["tensor"], "flat": ["fsdp"], "hidden": ["tensor"], "classes": []}


class Images:
    """Random-access source: example i = {"image": float32 (SIZE, SIZE, 1), "label": int32}: a class's
    fixed random template, shifted by up to a pixel, plus noise."""

    def __init__(self, n: int, seed: int):
        templates = np.random.default_rng(1234).normal(0.0, 1.0, (CLASSES, SIZE + 2, SIZE + 2))
        rng = np.random.default_rng(seed)
        self.label = rng.integers(0, CLASSES, n).astype(np.int32)
        dx, dy = rng.integers(0, 3, (2, n))
        self.image = np.stack([templates[c, x:x + SIZE, y:y + SIZE] for c, x, y in zip(self.label, dx, dy)])
        self.image = (self.image + rng.normal(0.0, 0.5, self.image.shape))[..., None].astype(np.float32)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": self.image[i], "label": self.label[i]}


def make_model(seed: int) -> Any:
    """The tutorial's CNN with logical axis names on its weights (batch statistics replicate)."""
    from flax import nnx

    def conv(c_in: int, c_out: int, rngs: nnx.Rngs) -> nnx.Conv:
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, None, "channels"))
        return nnx.Conv(c_in, c_out, kernel_size=(3, 3), kernel_init=init,
                        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("channels",)), rngs=rngs)

    def linear(d_in: int, d_out: int, names: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(d_in, d_out, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)

    class CNN(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv1 = conv(1, 16, rngs)
            self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)  # short runs: averages that catch up
            self.conv2 = conv(16, 32, rngs)
            self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
            self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = linear(3 * 3 * 32, 64, ("flat", "hidden"), rngs)
            self.dropout = nnx.Dropout(0.2, rngs=rngs)
            self.linear2 = linear(64, CLASSES, ("hidden", "classes"), rngs)

        def __call__(self, x: Any) -> Any:
            x = self.avg_pool(nnx.relu(self.bn1(self.conv1(x))))
            x = self.avg_pool(nnx.relu(self.bn2(self.conv2(x))))
            x = x.reshape(x.shape[0], -1)  # flatten
            return self.linear2(self.dropout(nnx.relu(self.linear1(x))))

    return CNN(rngs=nnx.Rngs(seed))


def loss_fn(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Mean cross-entropy, and the batch's accuracy logged beside it."""
    import jax.numpy as jnp
    import optax
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, print the held-out accuracy; a user error prints one line, exit 2."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--dir", default="runs/cnn_classifier")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    rules = [f"mesh.rules.{name}={axes}" for name, axes in RULES.items()]
    try:
        cfg = jaxinfra.load_config(None, [
            *rules, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"run.steps={args.steps}", f"run.dir={args.dir}",
            "run.log_every=10", f"run.eval_every={args.steps // 2}", "run.eval_batches=4", "data.batch_size=32",
            "optim.lr=3e-3", "optim.warmup_steps=5", "optim.weight_decay=0.0", "prune.pattern=2:4",
            f"prune.start_step={args.steps // 3}", "prune.exclude=[conv1/*]", f"checkpoint.every={args.steps // 2}",
            *args.overrides])
        jaxinfra.setup_devices(cfg)  # 8 simulated CPU devices (and jax.distributed when distributed.* is set)
        batch_axes = {"image": ("batch", None, None, None), "label": ("batch",)}
        result = jaxinfra.train_model(cfg, lambda: make_model(cfg.run.seed), loss_fn, Images(4096, seed=0),
                                      Images(100, seed=1), options=jaxinfra.TrainOptions(batch_axes=batch_axes))
    except jaxinfra.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "stopped_at" not in result:
        print(f"held-out accuracy {result['eval_accuracy']:.3f}, loss {result['eval_loss']:.3f} "
              f"after {result['step']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
