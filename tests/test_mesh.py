"""Mesh building, -1 filling, product checks, the description line, process counts and quiet collectives."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AxisType

from jaxinfra import cli
from jaxinfra.core.errors import UserError
from jaxinfra.parallel.mesh import (
    AXES,
    describe,
    init_distributed,
    make_mesh,
    process_count,
    resolve_shape,
)
from jaxinfra.parallel.quiet import clean

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
from jaxinfra.parallel.quiet import quiet_collectives
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
    # one file for both (SLURM's --output): one pipe keeps the order. Read to EOF, which comes once the
    # filter (orphaned after a SIGKILL, still passing lines on) has closed its end too
    done = subprocess.run([sys.executable, "-c", script, str(kill)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.stdout.splitlines() == ["first", "middle", *[x for i in range(200) for x in (
        f"out {i}: the host is connected to 3 peers", f"err {i}")]]


# Gloo's message as a 2-process run printed it (srun --label), and a line of the run's
GLOO_MESSAGE = b"[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
RUN_LINE = b"resumed from step 25\n"


def _cut_and_interleaved():
    """Gloo's message cut at every byte with the run's line written into the cut (the message goes on in
    the next line); the line's text followed by the message cut at every byte, the line's newline written
    into the cut (print() writes text and newline apart); the whole message written at every byte of the
    line. Each as (what it is, the writes)."""
    m, line = GLOO_MESSAGE, RUN_LINE
    for i in range(len(m) + 1):
        yield f"the line inside the message, cut at byte {i}", [m[:i], line, m[i:]]
        yield f"the message after the line's text, its newline at byte {i}", [line[:-1], m[:i], b"\n", m[i:]]
    for j in range(len(line)):
        yield f"the message inside the line at byte {j}", [line[:j], m, line[j:]]


def test_gloo_filter_drops_a_message_cut_anywhere_and_keeps_the_runs_line():
    """The filter's text, byte for byte: no Gloo text stays, wherever another write cut the message or
    wherever it landed in a line, and the run's line comes out whole."""
    cases = list(_cut_and_interleaved())
    assert len(cases) == 2 * (len(GLOO_MESSAGE) + 1) + len(RUN_LINE)
    for what, writes in cases:
        assert clean(b"".join(writes)) == RUN_LINE, f"{what}: {b''.join(writes)!r}"


def test_gloo_filter_process_passes_the_runs_lines_whole(tmp_path):
    """The same cases through the filter process (quiet_collectives), one after another on stdout, and
    the run's line on stderr at the same time: each stream comes out as just its lines."""
    cases = [b"".join(writes) for _, writes in _cut_and_interleaved()]
    script = (f"import os, sys\nfrom jaxinfra.parallel.quiet import quiet_collectives\nassert quiet_collectives()\n"
              f"for case in {cases!r}:\n    os.write(1, case)\n    os.write(2, {RUN_LINE!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == RUN_LINE * len(cases)
    assert done.stderr == RUN_LINE * len(cases)
