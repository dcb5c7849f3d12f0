"""Stage 4: `packer build` in a rendered build folder, its log streamed to a file and its
steps to the progress line. The chain around it is pipeline.py."""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from factory.errors import FactoryError, ToolError
from factory.processes import started, stop
from factory.progress import Progress
from factory.render import packer_env

# The whole `packer build`; each provisioner also has its own limit in the template.
PACKER_TIME_LIMIT_MINUTES = 240


_PACKER_STEPS = [
    (
        re.compile(r"Starting VM|Starting HTTP server|Copying hard drive|Resizing hard drive"),
        "preparing the build VM",
    ),
    (re.compile(r"Waiting for SSH"), "booting the base image (waiting for SSH)"),
    (re.compile(r"Connected to SSH"), "connected over SSH"),
    (re.compile(r"Uploading payload"), "uploading the payload"),
    (re.compile(r"factory-step: (.+)"), None),
    (re.compile(r"Gracefully halting"), "sealing and shutting down"),
    (re.compile(r"Converting hard drive|Compressing"), "compressing the disk"),
]


def _packer_message(line: str) -> str | None:
    """The human text of one -machine-readable line, or None for non-UI records."""
    fields = line.rstrip("\n").split(",", 3)
    if len(fields) < 4 or fields[2] != "ui":
        return None
    kind, _, text = fields[3].partition(",")
    text = text.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "")
    return text if kind in ("say", "message", "error") else None


def _step_of(text: str) -> str | None:
    for pattern, label in _PACKER_STEPS:
        match = pattern.search(text)
        if match:
            return label or match.group(1).strip()
    return None


def run_packer(
    build_dir: Path,
    key_file: Path,
    log_path: Path,
    progress: Progress,
    time_limit_minutes: float = PACKER_TIME_LIMIT_MINUTES,
) -> None:
    """Run `packer build`, streaming its log to a file and its steps to the progress line.
    Past `time_limit_minutes` packer and everything it started are stopped."""
    command = ["packer", "build", "-machine-readable", "-on-error=cleanup"]
    command += ["-var-file=image.pkrvars.hcl", "image.pkr.hcl"]
    # Packer leaves its temporary files (the build VM's seed) behind: give it a folder of the
    # build's own, removed when packer ends, however it ends.
    with (
        open(log_path, "a") as log,
        tempfile.TemporaryDirectory(prefix="factory-packer-") as scratch,
    ):
        expired = threading.Event()
        with started(
            command,
            _stop_packer,
            cwd=build_dir,
            env={**packer_env(key_file), "TMPDIR": scratch},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as process:
            watchdog = threading.Timer(
                time_limit_minutes * 60, _stop_at_time_limit, args=(process, expired)
            )
            watchdog.daemon = True
            watchdog.start()
            try:
                assert process.stdout is not None
                for line in process.stdout:
                    text = _packer_message(line)
                    if text is None:
                        continue
                    log.write(text + "\n")
                    log.flush()
                    step = _step_of(text)
                    if step:
                        progress.update(step)
                    else:
                        progress.refresh()
                code = process.wait()
            finally:
                watchdog.cancel()
    if expired.is_set():
        watchdog.join()  # until packer's whole process group is gone
        raise FactoryError(
            f"packer build ran past its time limit of {time_limit_minutes:g} min and was "
            f"stopped; see {log_path.name} in the build logs kept in outputs/logs/; if it was "
            "only slow, raise --time-limit"
        )
    if code != 0:
        # The staging folder goes; keep_failure_logs saves the log under outputs/logs/.
        raise ToolError(
            f"packer build failed (exit {code}); see {log_path.name} in the build logs kept "
            "in outputs/logs/"
        )


def _stop_at_time_limit(process: subprocess.Popen, expired: threading.Event) -> None:
    expired.set()
    _stop_packer(process)


def _stop_packer(process: subprocess.Popen) -> None:
    """Ask packer to clean up (it stops QEMU), then make sure nothing of it survives."""
    stop(process, group=True, first=signal.SIGINT, grace=60)
