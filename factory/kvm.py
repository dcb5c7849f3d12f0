"""Which QEMU accelerator to use, decided by booting a real kernel under KVM.

KVM is detected by booting a real kernel under it, never from ``/dev/kvm`` existing: on a nested
host ``/dev/kvm`` can exist while every guest hangs or dies with "KVM internal error".
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from factory import cache
from factory.cache import cache_subdir, inputs_key
from factory.errors import ToolError
from factory.files import replace_path, write_text_atomically
from factory.processes import die_with_parent, stop
from factory.tools import qemu_version, require, which

ACCELERATORS = ("auto", "kvm", "tcg")
KVM_DEVICE = "/dev/kvm"
QEMU = "qemu-system-x86_64"
# Bump when the probe command or its verdict changes, so old cached verdicts are not reused.
_PROBE_VERSION = 1
_PANIC_MARKER = "Kernel panic"
_KERNEL_META_PACKAGE = "linux-image-amd64"


# --------------------------------------------------------------------------- accelerator


def choose_accelerator(requested: str = "auto") -> str:
    """ "auto" -> "kvm" if KVM really boots a kernel, else "tcg"; "kvm"/"tcg" as given."""
    if requested == "auto":
        return "kvm" if kvm_boots() else "tcg"
    if requested in ("kvm", "tcg"):
        return requested
    raise ToolError(
        f"--accelerator {requested!r} is not valid; use one of: {', '.join(ACCELERATORS)}"
    )


def qemu_accel_args(accel: str, cpu_model: str | None = None) -> list[str]:
    """The QEMU arguments for an accelerator chosen by choose_accelerator(), with the CPU
    model (default: the host's CPU under KVM, QEMU's default under TCG)."""
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", cpu_model or "host"]
    if accel == "tcg":
        return ["-accel", "tcg,thread=multi", *(["-cpu", cpu_model] if cpu_model else [])]
    raise ToolError(f"--accelerator {accel!r} is not valid here; use kvm or tcg")


# --------------------------------------------------------------------------- probe kernel


def _probe_dir() -> Path:
    return cache_subdir(cache.PROBES)


def _newest(paths: list[str]) -> Path | None:
    files = [Path(p) for p in paths if os.path.isfile(p) and os.access(p, os.R_OK)]
    if not files:
        return None
    return max(files, key=lambda p: (p.stat().st_mtime, p.name))


def _extract_vmlinuz(deb: Path) -> Path:
    """Extract /boot/vmlinuz-* from a linux-image .deb into the probe cache (atomically)."""
    kernels = _probe_dir() / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kernels, prefix=".extract-") as tmp:
        dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        try:
            tar = subprocess.run(
                ["tar", "-x", "-C", tmp, "--wildcards", "./boot/vmlinuz-*"],
                stdin=dpkg.stdout,
                capture_output=True,
                text=True,
            )
        finally:
            if dpkg.stdout:
                dpkg.stdout.close()
            if dpkg.poll() is None:
                dpkg.kill()
            dpkg.wait()
        extracted = sorted(Path(tmp, "boot").glob("vmlinuz-*"))
        if tar.returncode != 0 or not extracted:
            raise ToolError(f"no /boot/vmlinuz-* in {deb.name}: {tar.stderr.strip()}")
        target = kernels / extracted[-1].name
        replace_path(extracted[-1], target)
        return target


def _download_kernel() -> Path:
    """Fetch the distribution kernel (linux-image-amd64's dependency) with apt, extract vmlinuz."""
    if not (which("apt-get") and which("apt-cache") and which("dpkg-deb")):
        raise ToolError("no host kernel in /boot and no apt-get/dpkg-deb to fetch one")
    depends = subprocess.run(
        ["apt-cache", "depends", _KERNEL_META_PACKAGE],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Depends:\s*(linux-image-\S+)", depends.stdout)
    if not match:
        raise ToolError(
            f"apt-cache depends {_KERNEL_META_PACKAGE} names no linux-image package "
            f"(run apt-get update?): {depends.stderr.strip()}"
        )
    package = match.group(1)
    # A .deb that apt already holds saves the download.
    held = _newest(glob.glob(f"/var/cache/apt/archives/{package}_*.deb"))
    if held:
        return _extract_vmlinuz(held)
    with tempfile.TemporaryDirectory(dir=_probe_dir(), prefix=".download-") as tmp:
        os.chmod(tmp, 0o755)  # apt drops to _apt for downloads when it can
        fetched = subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=900,
        )
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if fetched.returncode != 0 or not debs:
            raise ToolError(f"apt-get download {package} failed: {fetched.stderr.strip()[-500:]}")
        return _extract_vmlinuz(debs[-1])


def probe_kernel() -> tuple[Path, str]:
    """A kernel to boot the probe with, and where it came from.

    The host's newest /boot/vmlinuz-*; failing that, a kernel extracted earlier into the probe
    cache; failing that, Debian's current kernel package fetched with apt and extracted (once).
    Raises ToolError when none can be had.
    """
    host = _newest(glob.glob("/boot/vmlinuz-*"))
    if host:
        return host, "host /boot"
    cached = _newest(glob.glob(str(_probe_dir() / "kernels" / "vmlinuz-*")))
    if cached:
        return cached, "probe cache"
    return _download_kernel(), f"apt-get download ({_KERNEL_META_PACKAGE})"


# --------------------------------------------------------------------------- the probe


def _tail(text: str, lines: int = 12) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def _boot(kernel: Path, accel: str, timeout: float) -> dict:
    """Boot ``kernel`` with no initrd under ``accel``; it should panic on the missing root fs.

    Returns the evidence. QEMU is always killed and reaped, also on KeyboardInterrupt.
    """
    qemu = require(QEMU)
    with tempfile.TemporaryDirectory(prefix="factory-probe-") as tmp:
        log = Path(tmp, "console.log")
        log.touch()
        command = [
            qemu,
            *qemu_accel_args(accel),
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            f"file:{log}",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1",
        ]
        with open(Path(tmp, "stderr.log"), "w+b") as stderr:
            start = time.monotonic()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # the terminal's Ctrl-C reaches us, not QEMU
                preexec_fn=die_with_parent,
            )
            timed_out = False
            try:
                try:
                    exit_code: int | None = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    exit_code = None
            finally:
                # Nothing to clean up in a probe: QEMU goes at once.
                stop(proc, first=signal.SIGKILL, grace=5)
            seconds = round(time.monotonic() - start, 2)
            stderr.seek(0)
            stderr_text = stderr.read().decode(errors="replace")
        console = log.read_bytes().decode(errors="replace")
    panic = [line.strip() for line in console.splitlines() if _PANIC_MARKER in line]
    booted = bool(panic)
    if booted:
        reason = f"the kernel booted to its expected panic under {accel} in {seconds:.1f} s"
    elif timed_out:
        where = "no console output" if not console.strip() else "no panic on the console"
        reason = f"killed after {timeout:g} s with {where} (the guest hung under {accel})"
    else:
        last = _tail(stderr_text, 1)
        reason = f"QEMU exited with {exit_code} before the kernel got anywhere" + (
            f": {last[0]}" if last else ""
        )
    return {
        "accel": accel,
        "booted": booted,
        "reason": reason,
        "command": command,
        "exit_code": exit_code,
        "timed_out": timed_out,
        "timeout": timeout,
        "seconds": seconds,
        "panic_line": panic[0] if panic else None,
        "console_tail": _tail(console),
        "stderr_tail": _tail(stderr_text, 5),
    }


def kvm_probe(refresh: bool = False, timeout: float = 30.0, *, _accel: str = "kvm") -> dict:
    """The cached evidence whether a kernel boots under KVM (``_accel`` lets tests try TCG).

    The verdict is ``result["booted"]``; ``result["reason"]`` says why in one line. Results
    are cached in cache_dir()/probes/<accel>-<key>.json, keyed by the kernel, the QEMU
    version and the host kernel release; refresh=True probes again.
    """
    if _accel not in ("kvm", "tcg"):
        raise ToolError(f"cannot probe accelerator {_accel!r}; use kvm or tcg")
    if _accel == "kvm":
        if not os.path.exists(KVM_DEVICE):
            return _verdict(False, f"{KVM_DEVICE} does not exist")
        if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
            return _verdict(False, f"{KVM_DEVICE} is not readable and writable by this user")
    version = qemu_version()
    if version is None:
        return _verdict(False, f"{QEMU} not found")
    try:
        kernel, source = probe_kernel()
    except (ToolError, OSError, subprocess.SubprocessError) as exc:
        return _verdict(False, f"no kernel to probe with: {exc}")
    stat = kernel.stat()
    key = inputs_key(
        [str(kernel), stat.st_mtime_ns, stat.st_size, version, os.uname().release, _PROBE_VERSION]
    )
    cached = _probe_dir() / f"{_accel}-{key}.json"
    if not refresh and cached.is_file():
        try:
            evidence = json.loads(cached.read_text())
            evidence["cached"] = True
            return evidence
        except (OSError, ValueError):
            pass  # unreadable cache entry: probe again
    evidence = _boot(kernel, _accel, timeout)
    evidence.update(
        kernel=str(kernel),
        kernel_source=source,
        qemu_version=version,
        host_release=os.uname().release,
        probed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        cache_file=str(cached),
    )
    write_text_atomically(cached, json.dumps(evidence, indent=2) + "\n")
    evidence["cached"] = False
    return evidence


def _verdict(booted: bool, reason: str) -> dict:
    """Evidence for a verdict reached without booting anything (nothing is cached)."""
    return {"booted": booted, "reason": reason, "seconds": 0.0, "cached": False}


def kvm_boots(refresh: bool = False, timeout: float = 30.0, *, _accel: str = "kvm") -> bool:
    """Whether a real kernel boots under KVM here (cached; see kvm_probe)."""
    return bool(kvm_probe(refresh=refresh, timeout=timeout, _accel=_accel)["booted"])
