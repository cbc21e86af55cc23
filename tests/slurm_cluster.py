"""A one-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd from Debian's packages
(slurmctld slurmd slurm-client munge), started in a temporary folder with a generated slurm.conf and
stopped by pid. Nothing is read from or written to /etc: every command finds the cluster through
SLURM_CONF, the daemons' sockets, state and logs live in the folder.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "srun", "sbatch", "scontrol", "scancel", "sinfo", "squeue")

# cred_expire=5 and sched_interval=1: a requeued job may start again cred_expire + 1 s after the requeue
# (default 120 s) and is picked up at the next scheduling pass (default every 60 s); measured here,
# a requeue restarts in about 6 s with these, in about 130 s without them.
CONF = """\
ClusterName=jaxinfra-tests
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
MessageTimeout=10
InactiveLimit=0
FirstJobId={first_job}
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def missing() -> list[str]:
    """What keeps a cluster from starting here: SLURM and munge commands this machine lacks, or not
    being root (the generated slurm.conf runs the daemons as root); empty when nothing does."""
    return [d for d in DAEMONS if shutil.which(d) is None] + (["root"] if os.geteuid() != 0 else [])


PORT_TRIES = 3  # slurmctld's and slurmd's ports are picked free, then bound by the daemons: another
# process may take one in between (the daemon exits, "Address already in use"): new ports, up to this many times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """A daemon found its port taken."""


class Cluster:
    """start() returns once the node is idle; stop() cancels every job and ends the daemons it started."""

    def __init__(self) -> None:
        # short: munge's and slurmd's unix sockets must fit in 108 bytes
        self.dir = tempfile.mkdtemp(prefix="jxslurm-", dir="/tmp")
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, tuple[str, int]] = {}  # each daemon's output file, and where its latest start begins

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.conf, **extra}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, check=check,
                              timeout=timeout)

    def start(self, timeout: float = 60) -> None:
        """Start the daemons (stop() ends whatever started, also when this raises)."""
        for sub in ("state", "spool", "run", "log", "munge"):
            os.makedirs(os.path.join(self.dir, sub), mode=0o755)
        # JAX's coordinator port under SLURM is 61440 + job id % 4096: a random first id keeps two
        # clusters on one machine (two CI runs) off each other's ports
        first_job = random.randrange(1000, 4_000_000)
        munge = os.path.join(self.dir, "munge")
        subprocess.run(["mungekey", "--create", "--force", "--keyfile", f"{munge}/munge.key"], check=True,
                       capture_output=True)
        os.chmod(f"{munge}/munge.key", 0o600)
        self._spawn("munged", "munged", "--foreground", "--force", "--socket", f"{munge}/munge.socket",
                    "--key-file", f"{munge}/munge.key", "--pid-file", f"{munge}/munged.pid",
                    "--log-file", f"{munge}/munged.log", "--seed-file", f"{munge}/munged.seed")
        self._until(lambda: os.path.exists(f"{munge}/munge.socket"), 10, "munged's socket")
        for attempt in range(1, PORT_TRIES + 1):
            with open(self.conf, "w") as f:
                f.write(CONF.format(host=self.host, d=self.dir, ctld_port=_free_port(), slurmd_port=_free_port(),
                                    cpus=os.cpu_count(), first_job=first_job))
            self._spawn("slurmctld", "slurmctld", "-D", "-i", "-f", self.conf)
            self._spawn("slurmd", "slurmd", "-D", "-N", self.host, "-f", self.conf)
            try:
                self._until(self._idle, timeout, "the node to come up idle")
                return
            except PortTaken:
                self._end("slurmd", "slurmctld")
                if attempt == PORT_TRIES:
                    raise

    def _spawn(self, name: str, *cmd: str) -> None:
        path = os.path.join(self.dir, "log", f"{name}.out")
        with open(path, "ab") as log:
            self.logs[name] = (path, log.tell())  # this start's output begins here
            self.procs[name] = subprocess.Popen(list(cmd), env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def _idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                path, since = self.logs[name]
                with open(path, "rb") as f:
                    f.seek(since)
                    taken = b"Address already in use" in f.read()
                raise (PortTaken if taken else RuntimeError)(
                    f"{name} exited with status {proc.returncode}{' (its port was taken)' if taken else ''}; "
                    f"logs in {self.dir}/log")
        found = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
        return found.returncode == 0 and found.stdout.strip() == "idle"

    @staticmethod
    def _until(ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"SLURM test cluster: no sign of {what} after {timeout:.0f} s")
            time.sleep(0.2)

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's fields of a job (JobState, Restarts, ExitCode, ...), kept MinJobAge after it ends."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll the job until its state is one of `states`; returns its fields."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s, "
                                   f"waiting for {sorted(states)}")
            time.sleep(0.3)
        return info

    def stop(self) -> None:
        """Cancel every job, end the daemons by pid (TERM, then KILL), and any job step left behind."""
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.run("scancel", "--user", str(os.getuid()), check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.3)
        finally:  # the daemons and what is left of the jobs end even if slurmctld no longer answers
            try:
                self._end("slurmd", "slurmctld", "munged")
            finally:
                for pid in self._leftovers():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                shutil.rmtree(self.dir, ignore_errors=True)

    def _end(self, *names: str) -> None:
        """TERM to these daemons, KILL to any still there after 15 s; each reaped."""
        for name in names:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _leftovers(self) -> list[int]:
        """Processes of this cluster still there (a job step, its tasks): their environment holds its
        SLURM_CONF. The test process itself and its other children are not among them."""
        mine, found = f"SLURM_CONF={self.conf}".encode(), []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if mine in f.read().split(b"\0") and int(pid) != os.getpid():
                        found.append(int(pid))
            except OSError:
                pass
        return found
