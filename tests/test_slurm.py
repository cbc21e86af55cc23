"""Launching through SLURM as clusters do: srun of the launch script, sbatch of scripts/slurm/train.sbatch,
preemption by SIGTERM and a requeue, against a one-node cluster the tests start (tests/slurm_cluster.py)."""
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import slurm_cluster
from conftest import COORDINATOR_PORT_TAKEN, IN_CI
from test_resume import BASE, ROOT, _run

from jaxinfra.ckpt import reader as ckpt_reader

MISSING = slurm_cluster.missing()
WHY = (f"no {', '.join(MISSING)}: as root, apt-get install slurmctld slurmd slurm-client munge "
       "(.ci/run does)")
# outside CI a machine without SLURM skips these tests; under CI=true the fixture fails them, naming what is missing
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.slow,  # a cluster start and 60-step runs: the slow lane
              pytest.mark.skipif(bool(MISSING) and not IN_CI, reason=WHY)]

STEPS = 60  # long enough (about 0.1-0.5 s a step here) that a signal lands well before the end
ARGS = [*BASE, "mesh.cpu_devices=8", f"run.steps={STEPS}", "checkpoint.every=5"]  # the default (2,2,2) mesh
SEED = 29  # draws the step the sbatch test preempts at; a failure names it (and the step it drew)
STARTS = 3  # tries of a job start whose coordinator port (61440 + job id % 4096, JAX's choice) was taken
# Gloo's connection message in pieces: none may reach a log (jaxinfra.parallel.quiet drops them wherever they stand)
GLOO_TEXT = ("[Gloo]", "Gloo]", "is connected to", "peer ranks", "Expected number of connected")


@pytest.fixture(scope="module")
def slurm():
    if MISSING:
        pytest.fail(f"CI=true, but {WHY}", pytrace=False)
    cluster = slurm_cluster.Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _env(slurm):
    return {**{k: v for k, v in slurm.env().items() if k != "XLA_FLAGS"}, "PYTHON": sys.executable,
            "PYTHONUNBUFFERED": "1"}


def _losses(run_dir):
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def straight(slurm, tmp_path_factory):
    """`srun -n 2` of the launch script: 2 processes x 4 simulated devices, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("slurm") / "straight"
    for start in range(1, STARTS + 1):  # a new job id, a new coordinator port
        done = subprocess.run(["srun", "-n", "2", "--kill-on-bad-exit=1", sys.executable, "scripts/train.py", *ARGS,
                               f"run.dir={run_dir}"], cwd=ROOT, env=_env(slurm), capture_output=True, text=True,
                              timeout=300)
        if done.returncode == 0 or COORDINATOR_PORT_TAKEN not in done.stderr or start == STARTS:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout, done.stderr


def _gloo_lines(text):
    return [line for line in text.splitlines() if any(piece in line for piece in GLOO_TEXT)]


def test_srun_two_tasks_train_as_one_process_does(straight, tmp_path):
    run_dir, out, err = straight
    # JAX read SLURM's environment; mesh.cpu_devices=8 means all tasks together (4 each), as under launch_local.sh
    assert "over 8 cpu devices (cpu), 2 process(es)" in out
    assert not _gloo_lines(out + err)  # the collectives' connection messages ("[Gloo] Rank 0 is connected to 1 peer ranks...") are filtered out
    rc, _, err = _run([*ARGS, "run.stop_after=5", f"run.dir={tmp_path / 'one'}"])  # 1 process, 8 devices
    assert rc == 0, err[-2000:]
    one, two = _losses(tmp_path / "one"), _losses(run_dir)
    np.testing.assert_allclose([two[s] for s in range(1, 6)], [one[s] for s in range(1, 6)], rtol=2e-6)


def _wait_for(what, ready, timeout=180):
    deadline = time.monotonic() + timeout
    while not (found := ready()):
        assert time.monotonic() < deadline, f"no sign of {what} after {timeout} s"
        time.sleep(0.1)
    return found


def _newest_step(run_dir):
    """The newest step in metrics.jsonl (a line being written, or the file rewritten at a resume, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    steps = []
    for row in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(row)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps, default=0)


def _submit(slurm, run_dir, logs):
    """sbatch of scripts/slurm/train.sbatch over 2 tasks: the job's id and log once its run saved its
    first checkpoint. A start whose coordinator port was taken (the job fails before its first step) is
    submitted again, under a new id (STARTS tries)."""
    for start in range(1, STARTS + 1):
        log = logs / f"slurm-{start}.out"
        job = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", f"--output={log}",
                              "scripts/slurm/train.sbatch", *ARGS, f"run.dir={run_dir}"],
                             cwd=ROOT, env=_env(slurm), capture_output=True, text=True, check=True).stdout.strip()
        ended = lambda: slurm.job(job)["JobState"] in ENDED  # noqa: E731
        _wait_for("the first checkpoint", lambda: ckpt_reader.complete_steps(run_dir / "checkpoints") or ended())
        if ckpt_reader.complete_steps(run_dir / "checkpoints"):
            return job, log
        text = log.read_text() if log.exists() else ""
        assert COORDINATOR_PORT_TAKEN in text and start < STARTS, f"job {job} ended before its first checkpoint: {text[-3000:]}"


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def test_sbatch_preempted_by_sigterm_then_requeued_resumes_bit_exactly(slurm, straight, tmp_path):
    run_dir, rng, job, log, at = tmp_path / "run", random.Random(SEED), None, None, None
    try:
        job, log = _submit(slurm, run_dir, tmp_path)

        # 1. SIGTERM to every task (what a preempting scheduler sends) at a drawn step after the first checkpoint
        first = ckpt_reader.complete_steps(run_dir / "checkpoints")[0]
        at = rng.randint(first + 1, first + 10)
        _wait_for(f"step {at}", lambda: _newest_step(run_dir) >= at)
        slurm.run("scancel", "--signal=TERM", job)
        info = slurm.wait_job(job, ENDED, timeout=180)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
        stopped = int(text.split("stopping at step ")[1].split()[0])  # the step every process agreed on
        assert "(SIGTERM)" in text and at <= stopped < STEPS
        assert ckpt_reader.complete_steps(run_dir / "checkpoints")[-1] == stopped  # saved, and nothing newer
        assert not list((run_dir / "checkpoints").glob("*tmp*"))  # no partial step

        # 2. requeued by the cluster: the job starts again under its id and resumes from that step
        slurm.run("scontrol", "requeue", job)
        _wait_for("the requeued job", lambda: slurm.job(job)["Restarts"] == "1")
        _wait_for("the resumed run's steps", lambda: _newest_step(run_dir) >= stopped + 3)

        # 3. the time limit's warning (#SBATCH --signal=B:USR1@120) reaches the script, which stops the tasks
        #    at an agreed step and requeues the job itself
        slurm.run("scancel", "--batch", "--signal=USR1", job)
        _wait_for("the job's own requeue", lambda: slurm.job(job)["Restarts"] == "2")
        info = slurm.wait_job(job, ENDED, timeout=240)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
        assert text.count("resumed from step") == 2 and f"resumed from step {stopped}" in text
        assert "saved its step before the time limit; requeueing it" in text
        # no Gloo text anywhere: each task's filter drops it wherever it stands in a line, and passes whole
        # lines on (srun writes each task's lines whole, so the tasks' streams meet only at line ends)
        assert not _gloo_lines(text), _gloo_lines(text)

        # every step of the three starts equals the uninterrupted run bit for bit
        want, got = _losses(straight[0]), _losses(run_dir)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]
    except BaseException as e:
        e.add_note(f"SIGTERM at step {at}, drawn with seed {SEED} (tests/test_slurm.py SEED); job {job}, log {log}")
        raise
    finally:
        if job is not None:
            slurm.run("scancel", job, check=False)
