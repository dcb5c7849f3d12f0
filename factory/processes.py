"""Starting and stopping the child processes a stage starts (packer, QEMU, mmdebstrap)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Resolved once, in the parent (the C library the interpreter runs on): between fork and exec
# the child only makes the call.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


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


def stop_gently(process: subprocess.Popen, grace_seconds: float) -> None:
    """SIGTERM, so the tool can clean up after itself; SIGKILL if it is still there after
    `grace_seconds`."""
    with contextlib.suppress(ProcessLookupError, OSError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
