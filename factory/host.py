"""What the build host has, and which QEMU accelerator to use.

KVM is detected by booting a real kernel under it, never from ``/dev/kvm`` existing: on a nested
host ``/dev/kvm`` can exist while every guest hangs or dies with "KVM internal error".
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir, inputs_key
from .errors import ToolError
from .processes import die_with_parent

ACCELERATORS = ("auto", "kvm", "tcg")
KVM_DEVICE = "/dev/kvm"
QEMU = "qemu-system-x86_64"
# Bump when the probe command or its verdict changes, so old cached verdicts are not reused.
_PROBE_VERSION = 1
_PANIC_MARKER = "Kernel panic"
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_KERNEL_META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True)
class HostCheck:
    name: str
    ok: bool
    detail: str  # version found, or what is missing
    fix: str | None  # the exact command that installs it; None when ok
    required: bool  # a build cannot run without it


# --------------------------------------------------------------------------- tools


def require_root_and_tools(work: str, why_root: str, tools: dict[str, str], hint: str) -> None:
    """Refuse in one line when `work` cannot run here: not root, or a tool missing. `tools`
    maps each command to the Debian package that provides it."""
    if os.geteuid() != 0:
        raise ToolError(f"{work} needs root ({why_root}); {hint}")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        packages = " ".join(sorted({tools[tool] for tool in missing}))
        raise ToolError(
            f"{', '.join(missing)} not found, needed for {work}; "
            f"install with: apt-get install -y {packages}"
        )


def _which(tool: str) -> str | None:
    """Find a tool on $PATH, then in the sbin directories a non-root $PATH often lacks."""
    found = shutil.which(tool)
    if found:
        return found
    extra = os.pathsep.join(_SBIN_DIRS)
    return shutil.which(tool, path=extra)


def _first_line(argv: list[str], timeout: float = 15.0) -> str | None:
    """First non-empty line a command prints (stdout, then stderr), or None if it cannot run."""
    env = dict(os.environ, CHECKPOINT_DISABLE="1", LC_ALL="C")
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for stream in (done.stdout, done.stderr):
        for line in stream.splitlines():
            if line.strip():
                return line.strip()
    return None


def _dpkg_version(package: str) -> str | None:
    if not _which("dpkg-query"):
        return None
    line = _first_line(["dpkg-query", "-W", "-f=${Version}\n", package])
    return line if line and "no packages found" not in line.lower() else None


def packer_version() -> tuple[int, int, int] | None:
    """HashiCorp Packer's version from ``packer version``, or None when it is missing."""
    packer = _which("packer")
    if not packer:
        return None
    line = _first_line([packer, "version"])
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", line or "")
    if not match:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return (major, minor, patch)


def qemu_version() -> str | None:
    """The first line of ``qemu-system-x86_64 --version``, or None when it is missing."""
    qemu = _which(QEMU)
    return _first_line([qemu, "--version"]) if qemu else None


def _tool_check(
    name: str, package: str, version_argv: list[str] | None, required: bool = True
) -> HostCheck:
    path = _which(name)
    if not path:
        return HostCheck(
            name=name,
            ok=False,
            detail=f"{name} not found on PATH (Debian package {package})",
            fix=f"apt-get install -y {package}",
            required=required,
        )
    version = _first_line([path, *version_argv]) if version_argv else None
    if not version:
        packaged = _dpkg_version(package)
        version = f"{package} {packaged}" if packaged else None
    detail = f"{version} ({path})" if version else path
    return HostCheck(name=name, ok=True, detail=detail, fix=None, required=required)


def _packer_check() -> HostCheck:
    path = _which("packer")
    if not path:
        return HostCheck(
            name="packer",
            ok=False,
            detail="packer not found on PATH",
            fix="apt-get install -y packer",
            required=True,
        )
    version = packer_version()
    if version is None:
        return HostCheck(
            name="packer",
            ok=False,
            detail=f"{path} reports no version from `packer version` (not HashiCorp Packer?)",
            fix="apt-get install -y packer",
            required=True,
        )
    return HostCheck(
        name="packer",
        ok=True,
        detail=f"Packer {'.'.join(map(str, version))} ({path})",
        fix=None,
        required=True,
    )


def _root_check() -> HostCheck:
    is_root = os.geteuid() == 0
    return HostCheck(
        name="root",
        ok=is_root,
        detail="running as root"
        if is_root
        else f"running as uid {os.geteuid()}; building needs root (mmdebstrap --mode=root, "
        "loop devices, mount, and a chroot that installs the environments into the image)",
        fix=None if is_root else "sudo -E factory <command> (run the factory as root)",
        required=True,
    )


def _kvm_check() -> HostCheck:
    evidence = kvm_probe()
    if evidence["booted"]:
        detail = f"KVM boots a kernel ({evidence['seconds']:.1f} s); builds use -accel kvm"
    else:
        detail = f"KVM unusable, builds fall back to TCG (slower): {evidence['reason']}"
    return HostCheck(name="kvm", ok=evidence["booted"], detail=detail, fix=None, required=False)


def check_host() -> list[HostCheck]:
    """Everything a build needs from this host, in the order a user should fix it."""
    return [
        _packer_check(),
        _tool_check(QEMU, "qemu-system-x86", ["--version"]),
        _tool_check("qemu-img", "qemu-utils", ["--version"]),
        _tool_check("mmdebstrap", "mmdebstrap", ["--version"]),
        # Packer's cd_files (the NoCloud seed) shells out to genisoimage/xorriso/mkisofs.
        _tool_check("genisoimage", "genisoimage", ["--version"]),
        # cloud-localds builds the validation seeds; it has no --version, so dpkg says.
        _tool_check("cloud-localds", "cloud-image-utils", None),
        _tool_check("tar", "tar", ["--version"]),
        _tool_check("sfdisk", "fdisk", ["--version"]),
        _tool_check("mkfs.ext4", "e2fsprogs", ["-V"]),
        _root_check(),
        _kvm_check(),
    ]


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


# --------------------------------------------------------------------------- VM size

# What the host keeps for itself (packer, the host-side install, page cache) while a VM runs.
HOST_RESERVED_MIB = 4096
VM_MIN_MEMORY_MIB = 2048


def _meminfo_mib() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) // 1024
    return values


def vm_memory_limit_mib(info: dict[str, int] | None = None) -> int:
    """The most memory a VM may get here: total memory less what the host keeps, and never
    more than is available now."""
    info = info or _meminfo_mib()
    available = info.get("MemAvailable", info["MemTotal"])
    return max(0, min(info["MemTotal"] - HOST_RESERVED_MIB, available - 1024))


@dataclass(frozen=True)
class VMSize:
    cpus: int
    memory_mib: int


def local_vm_size(cpus: int, memory_mib: int, requested_mib: int | None = None) -> VMSize:
    """A VM's size on this host: the profile's hardware capped to what the host can give.
    `requested_mib` is an explicit demand (resources.build_memory) that must fit as asked."""
    info = _meminfo_mib()
    limit, total = vm_memory_limit_mib(info), info["MemTotal"]
    if requested_mib is not None and requested_mib > limit:
        raise ToolError(
            f"resources.build_memory: {requested_mib} MiB does not fit this host, which can "
            f"give a VM at most {limit} MiB (of {total} MiB); lower it or build on a bigger host"
        )
    if limit < VM_MIN_MEMORY_MIB:
        raise ToolError(
            f"this host can give a VM {limit} MiB (of {total} MiB, less {HOST_RESERVED_MIB} "
            f"kept for the host) but the build needs {VM_MIN_MEMORY_MIB} MiB; free memory or "
            "build on a bigger host"
        )
    memory = requested_mib or min(max(memory_mib, VM_MIN_MEMORY_MIB), limit)
    return VMSize(cpus=max(1, min(cpus, os.cpu_count() or 1)), memory_mib=memory)


# --------------------------------------------------------------------------- probe kernel


def _probe_dir() -> Path:
    path = cache_dir() / "probes"
    path.mkdir(parents=True, exist_ok=True)
    return path


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
        os.replace(extracted[-1], target)
        return target


def _download_kernel() -> Path:
    """Fetch the distribution kernel (linux-image-amd64's dependency) with apt, extract vmlinuz."""
    if not (_which("apt-get") and _which("apt-cache") and _which("dpkg-deb")):
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
    qemu = _which(QEMU)
    if not qemu:
        raise ToolError(f"{QEMU} not found (apt-get install -y qemu-system-x86)")
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
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
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
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    tmp.write_text(json.dumps(evidence, indent=2) + "\n")
    os.replace(tmp, cached)
    evidence["cached"] = False
    return evidence


def _verdict(booted: bool, reason: str) -> dict:
    """Evidence for a verdict reached without booting anything (nothing is cached)."""
    return {"booted": booted, "reason": reason, "seconds": 0.0, "cached": False}


def kvm_boots(refresh: bool = False, timeout: float = 30.0, *, _accel: str = "kvm") -> bool:
    """Whether a real kernel boots under KVM here (cached; see kvm_probe)."""
    return bool(kvm_probe(refresh=refresh, timeout=timeout, _accel=_accel)["booted"])
