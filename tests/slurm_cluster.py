"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd run as children of
the test, with their configuration, state, spool, sockets and logs in one folder, on ports of
their own, so that a Slurm or munge already running on the host is left alone.

    with slurm_cluster(tmp_path / "slurm") as cluster:
        job = cluster.sbatch(script, cwd=work)
        tasks = cluster.wait(job)  # each array task's JobState, ExitCode, Restarts...

Client commands need `cluster.env` (SLURM_CONF names this cluster's slurm.conf); jobs inherit it
from sbatch, so `scontrol requeue` inside a job reaches this cluster too. Debian 12 ships Slurm
22.05; docs/slurm.md says which setting is there for what.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TEST_MARK_VAR, started_processes

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
APT_COMMAND = "apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)
PROGRAMS = ("mungekey", "munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
NODE = "node1"
PARTITION = "test"
# A requeued job may start again only once its launch credential expired: 120 s by default,
# and 5 s is the least Slurm 22.05 accepts (a smaller value is ignored with an error).
CRED_EXPIRE_S = 5
# Unix socket paths (munged's, and slurmstepd's in the spool folder) must fit sun_path.
SOCKET_PATH_MAX = 107
STEPD_SOCKET_NAME = f"{NODE}_1234567.4294967291"  # NODE_JOBID.STEPID, the batch step's id
# The caller's own Slurm settings must not reach this cluster's client commands.
FOREIGN_ENV_PREFIXES = (
    "SLURM_",
    "SBATCH_",
    "SALLOC_",
    "SRUN_",
    "SQUEUE_",
    "SINFO_",
    "SCONTROL_",
    "SCANCEL_",
    "SACCT_",
)


def require_slurm() -> None:
    """Skip the test unless Slurm and munge are installed and this runs as root (slurmd starts
    each job as its user)."""
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): {APT_COMMAND}")
    if os.geteuid() != 0:
        pytest.skip("needs root: slurmd runs each job as the user who submitted it")


@dataclass
class SlurmCluster:
    folder: Path
    conf: Path
    env: dict[str, str]  # for client commands: SLURM_CONF, and the mark jobs inherit
    mark: str  # TEST_MARK_VAR's value in every daemon's and job's environment
    node: str = NODE
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def log_folder(self) -> Path:
        return self.folder / "log"

    @property
    def job_completions(self) -> Path:
        """jobcomp/filetxt's file: one line per job end, a requeue included."""
        return self.log_folder / "jobcomp.txt"

    def run(
        self, *args: str, check: bool = True, timeout: float = 30, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A client command (sbatch, squeue, scontrol...) against this cluster."""
        result = subprocess.run(
            args, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def sbatch(self, script: Path, *options: str, cwd: Path | None = None) -> str:
        """Submit a batch script; its job id (for an array, the array's id)."""
        out = self.run("sbatch", "--parsable", *options, str(script), cwd=cwd).stdout
        return out.strip().split(";")[0]

    def queued(self, job: str) -> list[str]:
        """The job's tasks that have not ended (pending, running, requeued, completing)."""
        result = self.run("squeue", "-h", "-j", job, "-o", "%i %T", check=False)
        if result.returncode != 0 and "Invalid job id" in result.stderr:
            return []  # ended long ago (MinJobAge) and forgotten
        if result.returncode != 0:
            raise RuntimeError(f"squeue -j {job}: {result.stderr}")
        return result.stdout.split("\n")[:-1]

    def wait(self, job: str, timeout: float = 60.0) -> list[dict[str, str]]:
        """Wait until none of the job's tasks is queued; then the tasks, as `tasks` gives them."""
        deadline = time.monotonic() + timeout
        while queued := self.queued(job):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job} still queued after {timeout:.0f} s: {queued}\n{self.logs()}"
                )
            self._check_daemons()
            time.sleep(0.2)
        return self.tasks(job)

    def tasks(self, job: str) -> list[dict[str, str]]:
        """`scontrol show job` for each of the job's tasks (JobState, ExitCode "6:0",
        Restarts, ArrayTaskId...), in task order. Slurm keeps an ended job MinJobAge seconds."""
        out = self.run("scontrol", "-o", "show", "job", job).stdout
        tasks = [_fields(line) for line in out.splitlines() if line.strip()]
        return sorted(tasks, key=lambda task: int(task.get("ArrayTaskId", "0") or 0))

    def completions(self) -> list[dict[str, str]]:
        """The job completion log's records, oldest first: each run that ended, a requeued one
        with JobState=PENDING, a retry's again with its own ExitCode."""
        if not self.job_completions.exists():
            return []
        return [_fields(line) for line in self.job_completions.read_text().splitlines() if line]

    def processes(self) -> list[str]:
        """The live processes this cluster started: daemons, slurmstepd and the jobs' own."""
        return started_processes(self.mark)

    def logs(self, lines: int = 30) -> str:
        """The end of each daemon's log, for an error message."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            for path in (self.log_folder / f"{name}.log", self.log_folder / f"{name}.stderr"):
                text = path.read_text(errors="replace") if path.exists() else ""
                if text.strip():
                    tail = "\n".join(text.splitlines()[-lines:])
                    parts.append(f"--- {path.name}\n{tail}")
                    break
        return "\n".join(parts)

    # ----------------------------------------------------------------- start and stop

    def _start_daemon(self, name: str, args: list[str], daemon_env: dict[str, str]) -> None:
        with open(self.log_folder / f"{name}.stderr", "wb") as stderr:
            self.daemons[name] = subprocess.Popen(
                args,
                env=daemon_env,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C on the tests reaches them only through us
            )

    def _check_daemons(self) -> None:
        for name, process in self.daemons.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited {process.returncode}\n{self.logs()}")

    def _wait_for(self, ready: Callable[[], bool], what: Callable[[], str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_daemons()  # a daemon that died says why at once
            if ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what()} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.1)

    def _node_state(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            result = self.run(
                "sinfo", "-h", "-N", "-n", self.node, "-o", "%T %E", check=False, timeout=10
            )
            return result.stdout.strip() if result.returncode == 0 else ""
        return ""

    def _stop(self) -> list[str]:
        """Cancel the jobs, stop the daemons (slurmd, slurmctld, then munged), kill whatever
        the cluster left running; what had to be killed, as "pid command line"."""
        ctld = self.daemons.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            with contextlib.suppress(Exception):
                jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout
                if jobs.split():
                    self.run("scancel", *jobs.split(), check=False, timeout=10)
                    deadline = time.monotonic() + 15
                    while (
                        time.monotonic() < deadline
                        and self.run(
                            "squeue", "-h", "-o", "%i", check=False, timeout=10
                        ).stdout.strip()
                    ):
                        time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.daemons.get(name)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # A job's slurmstepd may take a moment to end after the job did.
        deadline = time.monotonic() + 5
        while (leftovers := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for line in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        return leftovers


def _fields(line: str) -> dict[str, str]:
    """KEY=VALUE pairs of one `scontrol -o` or jobcomp/filetxt line (the first of each key)."""
    fields: dict[str, str] = {}
    for key, value in re.findall(r"(?:^|\s)(\w+)=(\S*)", line):
        fields.setdefault(key, value)
    return fields


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def slurm_conf(
    folder: Path,
    munge_socket: Path,
    ports: tuple[int, int],
    cpus: int,
    memory_mib: int,
    fake_gpu: bool,
    overrides: bool,
) -> str:
    """The cluster's slurm.conf (docs/slurm.md explains each setting)."""
    log = folder / "log"
    lines = [
        "# A one-node Slurm cluster for the tests (tests/slurm_cluster.py): all in this folder.",
        "ClusterName=factorytest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={log / 'slurmctld.log'}",
        f"SlurmdLogFile={log / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={log / 'jobcomp.txt'}",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "DefMemPerCPU=100",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "EnforcePartLimits=ALL",
        "MpiDefault=none",
        "ReturnToService=2",
        "MinJobAge=600",
        "KillWait=2",
        f"MailProg={shutil.which('true') or '/bin/true'}",
    ]
    if fake_gpu:
        lines.append("GresTypes=gpu")
    if overrides:
        lines.append("SlurmdParameters=config_overrides")
    gres = " Gres=gpu:1" if fake_gpu else ""
    lines += [
        f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={cpus} "
        f"RealMemory={memory_mib}{gres} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def slurm_cluster(
    folder: Path,
    *,
    cpus: int | None = None,
    memory_mib: int | None = None,
    fake_gpu: bool = False,
    timeout: float = 30.0,
) -> Iterator[SlurmCluster]:
    """Start a one-node cluster in `folder`; yield it once its node is idle; on leaving, cancel
    its jobs and stop its daemons. The test is skipped when Slurm is not installed.

    The node has this host's CPUs and 90% of its memory unless `cpus` or `memory_mib` say
    otherwise; more than the host has is accepted (SlurmdParameters=config_overrides) and not
    enforced, so a job may ask for a bigger node than this one. `fake_gpu` gives the node one
    gres/gpu whose device file is /dev/null: the scheduler then runs `--gres=gpu:1` jobs,
    though nothing in them sees a GPU."""
    require_slurm()
    folder = folder.resolve()
    if re.search(r"[\s,=#\"']", str(folder)):
        raise ValueError(f"{folder}: slurm.conf cannot hold this path (a space, ,=#\"')")
    munge_socket = folder / "munge" / "socket"
    for path in (munge_socket, folder / "spool" / STEPD_SOCKET_NAME):
        if len(str(path).encode()) > SOCKET_PATH_MAX:
            raise ValueError(f"{folder}: too long for a Unix socket path ({path}); use a shorter")
    for name in ("munge", "state", "spool", "log"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    # munged wants the socket's folder searchable by everyone; the key readable by it only.
    (folder / "munge").chmod(0o755)

    host_cpus, host_memory = os.cpu_count() or 1, _memory_mib()
    cpus = cpus or host_cpus
    memory_mib = memory_mib or host_memory * 9 // 10
    conf = folder / "slurm.conf"
    conf.write_text(
        slurm_conf(
            folder,
            munge_socket,
            tuple(_free_ports(2)),
            cpus,
            memory_mib,
            fake_gpu,
            overrides=cpus > host_cpus or memory_mib > host_memory,
        )
    )
    if fake_gpu:
        (folder / "gres.conf").write_text("Name=gpu File=/dev/null\n")

    mark = f"slurm-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV_PREFIXES)}
    env |= {"SLURM_CONF": str(conf), TEST_MARK_VAR: mark}
    cluster = SlurmCluster(folder=folder, conf=conf, env=env, mark=mark)

    leftovers: list[str] = []
    try:
        key = folder / "munge" / "munge.key"
        key.unlink(missing_ok=True)
        subprocess.run(
            ["mungekey", "--create", f"--keyfile={key}", "--bits=1024"],
            check=True,
            capture_output=True,
        )
        key.chmod(0o600)
        # --force: pytest's folders lie under /tmp/pytest-of-root (0700), which munged would
        # refuse as a socket's ancestor that not everyone can search.
        cluster._start_daemon(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={munge_socket}",
                f"--key-file={key}",
                f"--pid-file={folder / 'munge' / 'munged.pid'}",
                f"--seed-file={folder / 'munge' / 'munged.seed'}",
                "--num-threads=2",
            ],
            env,
        )
        cluster._wait_for(munge_socket.exists, lambda: "munged made no socket", timeout)
        cluster._start_daemon("slurmctld", ["slurmctld", "-D", "-f", str(conf)], env)
        cluster._start_daemon("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(conf)], env)
        cluster._wait_for(
            lambda: cluster._node_state().split(" ")[0] == "idle",
            lambda: f"node {NODE} not idle ({cluster._node_state() or 'sinfo: no answer'})",
            timeout,
        )
        yield cluster
    finally:
        leftovers = cluster._stop()
    if leftovers:
        raise RuntimeError(
            "the Slurm cluster left processes running (killed now):\n" + "\n".join(leftovers)
        )
