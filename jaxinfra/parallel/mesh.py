"""Device mesh utilities: simulated CPU devices, jax.distributed, the named (data, stage, fsdp, tensor) mesh.

Importable on its own (of jaxinfra it takes only the error type, the axis names and the output
filter, none of which imports JAX) so user code can build meshes with it.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxinfra.core.errors import UserError
from jaxinfra.parallel.quiet import quiet_collectives
from jaxinfra.settings.sections import MESH_AXES as AXES

# XLA's CPU scheduler that orders for concurrency lets simulated devices enter collectives in different
# orders when a step runs several at once (the layer scan's, the update's): N:M pruning on (2,2,2)
# deadlocked in a rendezvous from its third step (jax 0.10.2). The flag is read when the CPU client
# starts, so it goes into XLA_FLAGS with the device count; as a compile option it did not help.
CPU_COLLECTIVE_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_cpu_devices(n: int) -> None:
    """Ask for n simulated CPU devices (collectives scheduled in program order when n > 1); only
    effective before JAX's backend starts."""
    if n > 1 and CPU_COLLECTIVE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COLLECTIVE_FLAGS}".strip()
    if n > 0:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # the backend already started (with another count)
            raise UserError(f"mesh.cpu_devices={n} per process cannot take effect: JAX already started "
                            f"with {jax.local_device_count()} devices in this process") from None


# JAX's own SLURM detection (jax._src.clusters.slurm_cluster) needs all of these: an srun step, not the
# batch script around it
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")


def _slurm_step() -> bool:
    """Whether this process is a task of an srun step."""
    return all(v in os.environ for v in _SLURM_STEP)


def _cluster_from_env() -> bool:
    """Whether the environment describes a multi-process job JAX can auto-detect."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if _slurm_step() and int(os.environ["SLURM_NTASKS"]) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def process_count(num_processes: int = 0) -> tuple[int, str]:
    """Processes the run will have and the setting that says so (num_processes, SLURM's tasks, or 1)."""
    if num_processes > 0:
        return num_processes, "distributed.num_processes"
    if _slurm_step():
        return int(os.environ["SLURM_NTASKS"]), "SLURM_NTASKS"
    return 1, "processes"


def init_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                     quiet: bool = False) -> bool:
    """Call jax.distributed.initialize for multi-process runs; a single process runs unchanged.

    Explicit arguments win; otherwise JAX reads TPU / SLURM / JAX_COORDINATOR_ADDRESS settings.
    `quiet` drops Gloo's connection lines from this process's stdout and stderr (jaxinfra.parallel.quiet; the
    launch script sets it; the descriptors become pipes, so isatty() is False from then on).
    Returns whether jax.distributed was initialised.
    """
    if coordinator or num_processes > 1:
        if not coordinator or num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(
                f"distributed: coordinator={coordinator!r}, num_processes={num_processes}, "
                f"process_id={process_id}: a multi-process run needs all three, with "
                f"0 <= process_id < num_processes")
        if quiet:
            quiet_collectives()
        try:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                       process_id=process_id)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"distributed.coordinator={coordinator}: jax.distributed could not start "
                            f"({str(e).splitlines()[0][:200]})") from None
        return True
    if num_processes == 0 and _cluster_from_env():
        if quiet:
            quiet_collectives()
        jax.distributed.initialize()
        return True
    return False


def resolve_shape(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Fill one -1 from the device count and check the product; raises UserError."""
    sizes = dict(sizes)
    known = math.prod(s for s in sizes.values() if s != -1)
    missing = [a for a, s in sizes.items() if s == -1]
    if len(missing) > 1:
        raise UserError(f"at most one mesh size may be -1, got {sizes}")
    if missing:
        if n_devices % known:
            raise UserError(f"mesh.{missing[0]}=-1 cannot be filled: {n_devices} devices are not "
                            f"divisible by the other sizes' product {known}")
        sizes[missing[0]] = n_devices // known
    total = math.prod(sizes.values())
    if total != n_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise UserError(f"mesh {shape} = {total} devices, but {n_devices} are available "
                        f"(use -1 for one size to fill it)")
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None,
              dcn: Sequence[int] | None = None, stage: int = 1) -> Mesh:
    """A (data, stage, fsdp, tensor) mesh with Auto (GSPMD) axes over the given or all devices.

    `dcn` (one factor per axis, in that order) splits each axis into an across-granule factor
    (slices on TPU, processes elsewhere) times an in-granule one, as jax's hybrid device mesh lays
    it out: put data (or stage: one activation per micro-batch crosses it) across the slow network
    and keep fsdp and tensor inside a node. `stage` splits the stacked layers (pipeline.py).
    """
    devices = list(devices) if devices is not None else jax.devices()
    dcn = tuple(dcn) if dcn is not None else (1,) * len(AXES)
    if len(dcn) == len(AXES) - 1:  # (data, fsdp, tensor), as written before the stage axis
        dcn = (dcn[0], 1, *dcn[1:])
    sizes = resolve_shape({"data": data, "stage": stage, "fsdp": fsdp, "tensor": tensor}, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    types = (AxisType.Auto,) * len(AXES)
    if any(d != 1 for d in dcn):
        bad = [f"mesh.{a}={s} % mesh.dcn_{a}={d}" for a, s, d in zip(AXES, shape, dcn) if d < 1 or s % d]
        if bad:
            raise UserError(f"hybrid mesh: each size must divide by its across-node factor: {', '.join(bad)}")
        inner = tuple(s // d for s, d in zip(shape, dcn))
        # slices (TPU multi-slice) when devices report several, else processes (nodes)
        by_process = len({getattr(d, "slice_index", None) for d in devices}) <= 1
        try:
            grid = mesh_utils.create_hybrid_device_mesh(inner, tuple(dcn), devices, process_is_granule=by_process)
        except ValueError as e:
            granules = "processes" if by_process else "slices"
            raise UserError(f"hybrid mesh: in-node shape {inner} x across-node shape {tuple(dcn)} does not fit "
                            f"the {granules} ({str(e).splitlines()[0]})") from None
        return Mesh(grid, AXES, axis_types=types)
    if devices == jax.devices():
        # jax.make_mesh orders devices so tensor (the last, most communicating axis) is local.
        return jax.make_mesh(shape, AXES, axis_types=types)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=types)


def describe(mesh: Mesh) -> str:
    """One line: platform, devices, processes and axis sizes."""
    devs = mesh.devices.flat
    first = next(iter(devs))
    # a stage axis of 1 (no pipeline) is left out: the line reads as it did before pipelines
    axes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items() if not (n == "stage" and s == 1))
    kind = getattr(first, "device_kind", first.platform)
    return (f"mesh {axes} over {mesh.devices.size} {first.platform} devices ({kind}), "
            f"{jax.process_count()} process(es), this is process {jax.process_index()}")
