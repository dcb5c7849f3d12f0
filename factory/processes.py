"""Starting, logging and stopping the child processes a stage starts (packer, QEMU,
mmdebstrap), and turning stop signals into exceptions so every stage's cleanup runs."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from factory.errors import ToolError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Resolved once, in the parent (the C library the interpreter runs on): between fork and exec
# the child only makes the call.
_prctl = ctypes.CDLL(None, use_errno=True).prctl

# `kill`, a closed terminal or dropped SSH session, and Ctrl-\: each stops factory cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Terminated(SystemExit):
    """SIGTERM, SIGHUP or SIGQUIT, handled like Ctrl-C so every stage cleans up. A SystemExit
    with the shell's code for the signal, so that uncaught it still ends factory as the signal
    would."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def die_with_parent() -> None:
    """preexec_fn for subprocess.Popen: the child gets SIGTERM when the thread that started it
    ends, even when factory itself is killed with SIGKILL, so no packer or QEMU outlives it.
    Start such children from the main thread (Linux sends the signal when the starting thread
    exits)."""
    parent = os.getppid()
    if _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def stop(
    process: subprocess.Popen,
    *,
    group: bool = True,
    first: int = signal.SIGTERM,
    grace: float = 10.0,
) -> None:
    """Send `first` (to the process group the child leads, with group=True) so the tool can
    clean up after itself, wait up to `grace` seconds, then SIGKILL whatever is left."""

    def send(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)

    if process.poll() is None or group:
        send(first)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # Children of the group may outlive its leader; SIGKILL reaches them too.
    if group or process.poll() is None:
        send(signal.SIGKILL)
    process.wait()


def _leave_hung_up_terminal() -> None:
    """After a hang-up every write to the terminal fails (EIO), which would cut the cleanup
    short: send stdout and stderr to /dev/null when they are a terminal."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _raise_terminated(signum: int, frame: object) -> None:
    if signum == signal.SIGHUP:
        _leave_hung_up_terminal()
    raise Terminated(signum)


@contextlib.contextmanager
def signals_as_exceptions(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, each of `signals` raises Terminated, so `finally` blocks unmount,
    detach and remove on kill too. The previous handlers come back afterwards. Only the main
    thread receives signals, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and the stop signals while cleaning up, then deliver them as exceptions."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, *STOP_SIGNALS)
    previous = {
        signum: signal.signal(signum, lambda got, frame: pending.append(got)) for signum in held
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            if pending[0] == signal.SIGINT:
                raise KeyboardInterrupt
            _raise_terminated(pending[0], None)


@contextlib.contextmanager
def started(
    command: list[str], stop_child: Callable[[subprocess.Popen], None], **popen: Any
) -> Iterator[subprocess.Popen]:
    """Start `command` (with die_with_parent); when the block raises, `stop_child` stops it. A
    stop signal during the start waits until the process is held, so it is stopped too instead
    of left running."""
    process: subprocess.Popen | None = None
    try:
        with signals_deferred():
            process = subprocess.Popen(command, preexec_fn=die_with_parent, **popen)
        yield process
    except BaseException:
        if process is not None:
            stop_child(process)
        raise


class LoggedRunner:
    """Runs commands with their output in a log file, and one progress line per step.

    A failed command raises ToolError with the last line it logged and the log's path."""

    def __init__(self, logf: IO[str], logfile: Path, log: Callable[[str], None]) -> None:
        self.logf = logf
        self.logfile = logfile
        self.log = log
        self.facts: dict[str, str] = {}  # what the steps learn, for the caller's record

    def step(self, message: str) -> None:
        self.log(message)
        self.note(f"=== {message}")

    def note(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        self.logf.write(f"[{stamp}] {message}\n")
        self.logf.flush()

    def __call__(
        self, *cmd: str, input: str | None = None, capture: bool = False, check: bool = True
    ) -> str:
        self.note("$ " + " ".join(cmd))
        with started(
            list(cmd),
            _stop_with_time_to_unmount,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else self.logf,
            stderr=self.logf,
            text=True,
        ) as proc:
            out, _ = proc.communicate(input)
        if capture and out:
            self.logf.write(out)
            self.logf.flush()
        if check and proc.returncode != 0:
            raise ToolError(
                f"{cmd[0]} failed (exit {proc.returncode}): {self._last_line()}; "
                f"full log: {self.logfile}"
            )
        return out or ""

    def _last_line(self) -> str:
        self.logf.flush()
        with open(self.logfile, encoding="utf-8", errors="replace") as handle:
            lines = [
                line.strip()
                for line in handle.read()[-8192:].splitlines()
                if line.strip() and not line.startswith("[")
            ]
        return lines[-1][:200] if lines else "no output"


def _stop_with_time_to_unmount(process: subprocess.Popen) -> None:
    stop(process, group=False, grace=30)  # mmdebstrap cleans up its own mounts on SIGTERM
