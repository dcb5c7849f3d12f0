"""Stopping the child processes a stage starts (QEMU, mmdebstrap)."""

from __future__ import annotations

import contextlib
import signal
import subprocess


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
