"""Performance yardsticks: the measured matmul peak (the denominator of MFU) and a profiler window."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

# Vendor dense peaks (FLOP/s, no sparsity) by device kind, for MFU against the datasheet as well.
VENDOR_PEAKS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float16"): 989e12, ("H100", "float32"): 67e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float16"): 312e12, ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12, ("TPU v5 lite", "bfloat16"): 197e12, ("TPU v5p", "bfloat16"): 459e12,
}


def vendor_peak(device: jax.Device, dtype: str) -> float | None:
    """The datasheet's dense peak of one device for `dtype`, when this table knows its kind."""
    kind = device.device_kind
    for (name, dt), peak in VENDOR_PEAKS.items():
        if name in kind and dt == dtype:
            return peak
    return None


def matmul_peak(device: jax.Device | None = None, dtype: str = "float32", n: int | None = None,
                reps: int = 5) -> float:
    """Dense n x n matmul FLOP/s that one device reaches in `dtype` (median of `reps` after a warm-up).

    Random operands (zeros or ones can run faster than real data); n defaults to 2048 on CPU and
    8192 on accelerators, large enough to fill the chip.
    """
    device = device or jax.devices()[0]
    n = n or (2048 if device.platform == "cpu" else 8192)
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.device_put(jax.random.normal(k, (n, n), jnp.float32).astype(dtype), device) for k in keys)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def mesh_peak(mesh: jax.sharding.Mesh, dtype: str) -> float:
    """Peak FLOP/s of the whole mesh: simulated CPU devices share one host, so their peak is the
    host's (one device's matmul already uses every core); accelerators add up."""
    devices = list(mesh.devices.flat)
    per_device = matmul_peak(devices[0], dtype)
    return per_device if devices[0].platform == "cpu" else per_device * len(devices)


class ProfileWindow:
    """Trace steps [first, last] with jax.profiler into `log_dir` (open with TensorBoard / XProf)."""

    def __init__(self, log_dir: str, steps: list[int]):
        self.log_dir = log_dir
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.active = False

    def after_dispatch(self, step: int, state: object) -> None:
        """Call after step `step` is dispatched: starts before `first`, stops once `last` has run."""
        if step == self.first - 1 and not self.active:
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.log_dir)
            self.active = True
        elif step == self.last and self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        """Stop a trace the run left open (it ended inside the window)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
