"""Mesh building, -1 filling, product checks, the description line, process counts and quiet collectives."""
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from jax.sharding import AxisType

from jaxinfra import cli
from jaxinfra.errors import UserError
from jaxinfra.mesh import AXES, describe, init_distributed, make_mesh, process_count, resolve_shape

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sizes, expect", [
    ((2, 2, 2), (2, 2, 2)), ((-1, 1, 1), (8, 1, 1)), ((1, -1, 2), (1, 4, 2)), ((2, 2, -1), (2, 2, 2)),
    ((1, 8, 1), (1, 8, 1)),
])
def test_make_mesh_fills_minus_one(sizes, expect):
    mesh = make_mesh(*sizes)
    assert mesh.axis_names == AXES and mesh.shape["stage"] == 1
    assert tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor")) == expect
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_mesh_over_a_subset_of_devices():
    mesh = make_mesh(-1, 2, 1, devices=jax.devices()[:4])
    assert mesh.shape["data"] == 2 and mesh.devices.size == 4


@pytest.mark.parametrize("sizes, words", [
    ({"data": 3, "fsdp": 2, "tensor": 2}, ["data=3", "12", "8"]),
    ({"data": -1, "fsdp": 3, "tensor": 1}, ["mesh.data=-1", "8", "3"]),
    ({"data": -1, "fsdp": -1, "tensor": 1}, ["-1"]),
])
def test_bad_mesh_sizes(sizes, words):
    with pytest.raises(UserError) as e:
        resolve_shape(sizes, 8)
    for w in words:
        assert w in str(e.value)


def test_describe_names_axes_devices_processes():
    line = describe(make_mesh(2, 2, 2))
    for w in ("data=2", "fsdp=2", "tensor=2", "8 cpu devices", "1 process"):
        assert w in line


def test_single_process_needs_no_distributed():
    assert init_distributed() is False
    with pytest.raises(UserError, match="process_id"):
        init_distributed("127.0.0.1:1234", 2, 5)


SRUN_STEP = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "3", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_STEP_NODELIST": "node0"}


def test_mesh_cpu_devices_counts_every_slurm_task(monkeypatch, capsys):
    """Under srun the process count comes from SLURM, as under launch_local.sh from distributed.*: a count
    that does not divide is one line before JAX starts."""
    assert process_count() == (1, "processes")
    assert process_count(4) == (4, "distributed.num_processes")
    for k, v in SRUN_STEP.items():
        monkeypatch.setenv(k, v)
    assert process_count() == (3, "SLURM_NTASKS")
    assert cli.main(["mesh.cpu_devices=8"]) == 2
    assert capsys.readouterr().err.strip() == ("error: mesh.cpu_devices=8 (all processes together) is not "
                                               "divisible by SLURM_NTASKS=3")
    monkeypatch.delenv("SLURM_STEP_NODELIST")  # the batch script around srun: not a step, one process
    assert process_count() == (1, "processes")


GLOO_SCRIPT = """
import os, sys
from jaxinfra.quiet import quiet_collectives
assert quiet_collectives()
print("first", flush=True)
os.write(1, b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\\n")
os.write(1, b"[Gloo] Rank [Gloo] Rank 01 is connected to  is connected to 3\\n")  # two communicators interleaved
os.write(1, b"3 peer ranks. Expected number of connected peer ranks is : 3\\n")
os.write(2, b"[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\\n")
os.write(1, b"[Gloo] Rank 1 is conne")  # another line written into the middle of a message
print("middle", flush=True)
os.write(1, b"cted to 1 peer ranks. Expected number of connected peer ranks is : 1\\n")
for i in range(200):
    print(f"out {i}: the host is connected to 3 peers", flush=True)
    print(f"err {i}", file=sys.stderr, flush=True)
os.kill(os.getpid(), int(sys.argv[1]))
"""


@pytest.mark.parametrize("kill", [9, 0])
def test_quiet_collectives_drops_gloo_lines_and_keeps_the_rest(tmp_path, kill):
    """Gloo's connection lines, whole or in the pieces concurrent communicators interleave, are dropped
    from stdout and stderr; everything else comes out in order, also when the process is killed."""
    script = GLOO_SCRIPT if kill else GLOO_SCRIPT.replace("os.kill(", "0 and os.kill(")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, str(kill)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == (-9 if kill else 0)
    assert done.stdout == "first\nmiddle\n" + "".join(f"out {i}: the host is connected to 3 peers\n" for i in range(200))
    assert done.stderr == "".join(f"err {i}\n" for i in range(200))
    with open(tmp_path / "both", "w") as both:  # one file for both (SLURM's --output): one pipe keeps the order
        done = subprocess.run([sys.executable, "-c", script, str(kill)], stdout=both, stderr=both, timeout=60,
                              cwd=tmp_path, env=env)
    want = 2 + 2 * 200  # after a SIGKILL the orphaned filter may still be passing lines on: wait for them
    deadline = time.monotonic() + 30
    while len(lines := (tmp_path / "both").read_text().splitlines()) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines == ["first", "middle", *[x for i in range(200) for x in (f"out {i}: the host is connected to 3 peers", f"err {i}")]]
