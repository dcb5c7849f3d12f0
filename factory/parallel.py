"""Several builds at once: one child process per profile, at most `limit` running.

Each child's output goes to its own log; a failure never stops the others. Ctrl-C or SIGTERM
stops every child (each cleans up as on its own Ctrl-C). Builds that share layers make each
once: the children take the layer store's build locks (factory.layers).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory import events
from factory.errors import FactoryError
from factory.processes import die_with_parent, signals_deferred, stop
from factory.progress import plain_log
from factory.tables import format_table

FACTORY = (sys.executable, "-m", "factory")
POLL_SECONDS = 0.25
# A stopped build gets this long to clean up (unmount, stop QEMU) before SIGKILL.
STOP_GRACE_SECONDS = 60.0
# The line `factory build` ends with; the summary reads the delivery's name from it.
_BUILT = re.compile(r"^built (\S+) in \d+ s: ")
_ERROR_PREFIXES = ("error:", "internal error:", "interrupted")


def built_line(name: str, seconds: float, final: Path) -> str:
    return f"built {name} in {seconds:.0f} s: {final}"


@dataclass(frozen=True)
class Job:
    name: str  # how progress lines and the summary name it
    argv: tuple[str, ...]
    log: Path


@dataclass(frozen=True)
class Outcome:
    job: Job
    result: str  # passed, FAILED, stopped or not started
    seconds: float = 0.0
    delivery: str | None = None
    error: str = ""
    exit_code: int | None = None  # the child's, once it ended by itself


def build_jobs(
    profiles: list[Path], global_args: list[str], build_args: list[str], logs: Path
) -> list[Job]:
    """One `python -m factory build` per profile, logging to <logs>/<profile stem>.build.log."""
    by_log: dict[Path, Path] = {}
    for profile in profiles:
        log = logs / f"{profile.stem}.build.log"
        if log in by_log:
            raise FactoryError(
                f"PROFILES: {by_log[log]} and {profile} would share the log {log}; "
                "give each profile its own file name"
            )
        by_log[log] = profile
    return [
        Job(
            name=str(profile),
            argv=(*FACTORY, *global_args, "build", str(profile), *build_args),
            log=log,
        )
        for log, profile in by_log.items()
    ]


class Batch:
    """Runs the jobs; `outcomes()` says how each ended, also after an interruption."""

    def __init__(self, jobs: list[Job], limit: int, log: Callable[[str], None] = plain_log):
        if limit < 1:
            raise FactoryError(f"--jobs: {limit} is too few; run at least 1 build at a time")
        self.jobs = jobs
        self.limit = limit
        self.log = log
        self.finished: dict[str, Outcome] = {}
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.relay = events.Relay()  # each child's events, with --events

    def run(self) -> list[Outcome]:
        waiting = list(self.jobs)
        try:
            while waiting or self.running:
                while waiting and len(self.running) < self.limit:
                    self._start(waiting.pop(0))
                time.sleep(POLL_SECONDS)
                self.relay.pump()
                for name, (process, started) in list(self.running.items()):
                    if process.poll() is not None:
                        self._finish(name, process.returncode, time.monotonic() - started)
        except BaseException:
            with signals_deferred():  # a second Ctrl-C must not cut the stopping short
                self._stop_running()
            raise
        finally:
            self.relay.pump()
        return self.outcomes()

    def outcomes(self) -> list[Outcome]:
        """In the order the jobs were given."""
        return [self.finished.get(job.name, Outcome(job, "not started")) for job in self.jobs]

    def _number(self, job: Job) -> str:
        return f"[{self.jobs.index(job) + 1}/{len(self.jobs)}]"

    def _start(self, job: Job) -> None:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if events.enabled():
            events_file = job.log.with_name(job.log.name.removesuffix(".log") + ".events.jsonl")
            self.relay.watch(events_file)
            env[events.EVENTS_FILE_VAR] = str(events_file)
        with open(job.log, "w", encoding="utf-8") as handle:
            handle.write("$ " + " ".join(job.argv) + "\n")
            handle.flush()
            process = subprocess.Popen(
                job.argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own process group: Ctrl-C reaches this process only, which then stops
                # each child's whole group; PDEATHSIG covers this process being killed.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.running[job.name] = (process, time.monotonic())
        self.log(f"{self._number(job)} {job.name}: started; log {job.log}")

    def _finish(self, name: str, returncode: int, seconds: float) -> None:
        del self.running[name]
        job = next(j for j in self.jobs if j.name == name)
        delivery, error = read_log(job.log)
        if returncode == 0:
            outcome = Outcome(job, "passed", seconds, delivery, exit_code=0)
            self.log(f"{self._number(job)} {name}: passed in {seconds:.0f} s ({delivery or '-'})")
        else:
            error = error or _exit_text(returncode)
            outcome = Outcome(job, "FAILED", seconds, None, error, returncode)
            self.log(f"{self._number(job)} {name}: FAILED in {seconds:.0f} s: {error}")
        self.finished[name] = outcome

    def _stop_running(self) -> None:
        """Stop every running child at once (each may take its grace time to clean up)."""
        stoppers = [
            threading.Thread(target=stop, args=(process,), kwargs={"grace": STOP_GRACE_SECONDS})
            for process, _ in self.running.values()
        ]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        for name, (_, started) in list(self.running.items()):
            job = next(j for j in self.jobs if j.name == name)
            seconds = time.monotonic() - started
            self.finished[name] = Outcome(job, "stopped", seconds, None, "interrupted")
            del self.running[name]


def read_log(log: Path) -> tuple[str | None, str]:
    """The delivery a build's log ends with, and its last error line (or '')."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 65536))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None, f"cannot read {log}"
    delivery = next((m.group(1) for line in lines if (m := _BUILT.match(line))), None)
    errors = [line.strip() for line in lines if line.startswith(_ERROR_PREFIXES)]
    return delivery, errors[-1][:300] if errors else ""


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit {returncode}, no error line in the log"


def format_summary(outcomes: list[Outcome]) -> str:
    rows = [
        (
            o.job.name,
            o.delivery or "-",
            o.result,
            f"{o.seconds:.0f}",
            str(o.job.log),
            o.error if o.result != "passed" else "",
        )
        for o in outcomes
    ]
    return format_table(("PROFILE", "DELIVERY", "RESULT", "SECONDS", "LOG", "ERROR"), rows)
