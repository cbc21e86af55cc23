"""Performance yardsticks: the measured matmul peak (the denominator of MFU) and a profiler window."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def matmul_peak(device: jax.Device | None = None, dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """Dense n x n matmul FLOP/s that one device reaches in `dtype` (median of `reps` after a warm-up)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
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
