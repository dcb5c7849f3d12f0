"""The external tools factory runs, and the Debian package each comes from: the one table that
`factory doctor` lists and every "not found" error is worded from."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable

from factory.errors import InfrastructureError

# command -> Debian package that provides it
TOOLS: dict[str, str] = {
    "packer": "packer",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    # Shows a layer as a raw file (FUSE) so that the host mounts it (factory/assemble.py).
    "qemu-storage-daemon": "qemu-system-common",
    "fstrim": "util-linux",
    "mmdebstrap": "mmdebstrap",
    # Packer's cd_files (the build's NoCloud seed) shells out to genisoimage.
    "genisoimage": "genisoimage",
    "cloud-localds": "cloud-image-utils",
    "tar": "tar",
    "sfdisk": "fdisk",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "chroot": "coreutils",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "shellcheck": "shellcheck",
    # The container image (factory/oci.py) and its checks (factory/validate/container.py).
    "umoci": "umoci",
    "skopeo": "skopeo",
    "podman": "podman",
    "runc": "runc",
    # `factory deploy --to libvirt` (factory/deploy_libvirt.py).
    "virsh": "libvirt-clients",
}

# Where root's tools live; a non-root $PATH often lacks them.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def package_of(tool: str) -> str:
    """The Debian package that provides `tool`."""
    if tool not in TOOLS:
        raise KeyError(f"{tool!r} is not in factory.tools.TOOLS; add it with its Debian package")
    return TOOLS[tool]


def install_command(tools: Iterable[str]) -> str:
    """The one apt-get line that installs every tool named."""
    return "apt-get install -y " + " ".join(sorted({package_of(tool) for tool in tools}))


def which(tool: str) -> str | None:
    """Find a tool on $PATH, then in the sbin directories a non-root $PATH often lacks."""
    return shutil.which(tool) or shutil.which(tool, path=os.pathsep.join(_SBIN_DIRS))


def missing(tools: Iterable[str]) -> list[str]:
    """The tools, of those named, that this host lacks."""
    return [tool for tool in tools if which(tool) is None]


def require(tool: str) -> str:
    """The absolute path of `tool`, or an InfrastructureError that says how to install it."""
    path = which(tool)
    if path is None:
        raise InfrastructureError(f"`{tool}` is missing; run `{install_command([tool])}`")
    return path


def require_root_and_tools(work: str, why_root: str, tools: Iterable[str], hint: str) -> None:
    """Refuse in one line when `work` cannot run here: not root, or a tool missing."""
    if os.geteuid() != 0:
        raise InfrastructureError(f"{work} needs root ({why_root}); {hint}")
    absent = missing(tools)
    if absent:
        raise InfrastructureError(
            f"{', '.join(absent)} not found, needed for {work}; "
            f"install with: {install_command(absent)}"
        )


# --------------------------------------------------------------------------- versions


def first_line(argv: list[str], timeout: float = 15.0) -> str | None:
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


def dpkg_version(package: str) -> str | None:
    """The installed version of a Debian package, or None."""
    if not which("dpkg-query"):
        return None
    line = first_line(["dpkg-query", "-W", "-f=${Version}\n", package])
    return line if line and "no packages found" not in line.lower() else None


def packer_version() -> tuple[int, int, int] | None:
    """HashiCorp Packer's version from ``packer version``, or None when it is missing."""
    packer = which("packer")
    if not packer:
        return None
    line = first_line([packer, "version"])
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", line or "")
    if not match:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return (major, minor, patch)


def qemu_version() -> str | None:
    """The first line of ``qemu-system-x86_64 --version``, or None when it is missing."""
    qemu = which("qemu-system-x86_64")
    return first_line([qemu, "--version"]) if qemu else None
