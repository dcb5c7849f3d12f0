"""`factory doctor`: what this host has for a build and what it lacks, each missing tool with
the command that installs it (from factory.tools.TOOLS)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from factory import kvm
from factory.tools import (
    TOOLS,
    dpkg_version,
    first_line,
    install_command,
    packer_version,
    which,
)


@dataclass(frozen=True)
class HostCheck:
    name: str
    ok: bool
    detail: str  # version found, or what is missing
    fix: str | None  # the exact command that installs it; None when ok
    required: bool  # a build cannot run without it


# How a tool tells its version (default --version); None: it has no such flag, dpkg says.
VERSION_ARGS: dict[str, list[str] | None] = {
    "packer": ["version"],
    "mkfs.ext4": ["-V"],
    "e2fsck": ["-V"],
    "resize2fs": None,
    "cloud-localds": None,
}
# Useful, but a build runs without them: apt-get and dpkg-deb only fetch a kernel for the KVM
# probe when the host has none, shellcheck checks the stage scripts; the container tools make
# and check `--format oci`, and virsh serves `factory deploy`.
OPTIONAL_TOOLS = (
    "apt-get",
    "dpkg-deb",
    "shellcheck",
    "umoci",
    "skopeo",
    "podman",
    "runc",
    "virsh",
)


def check_host() -> list[HostCheck]:
    """Everything a build needs from this host, in the order a user should fix it: every tool
    in factory.tools.TOOLS, then root, then KVM."""
    checks = [_packer_check()]
    checks += [
        _tool_check(tool, TOOLS[tool], VERSION_ARGS.get(tool, ["--version"]))
        for tool in TOOLS
        if tool != "packer"
    ]
    return [*checks, _root_check(), _kvm_check()]


def _tool_check(name: str, package: str, version_argv: list[str] | None) -> HostCheck:
    required = name not in OPTIONAL_TOOLS
    path = which(name)
    if not path:
        return HostCheck(
            name=name,
            ok=False,
            detail=f"{name} not found on PATH (Debian package {package})",
            fix=install_command([name]),
            required=required,
        )
    version = first_line([path, *version_argv]) if version_argv else None
    if not version:
        packaged = dpkg_version(package)
        version = f"{package} {packaged}" if packaged else None
    detail = f"{version} ({path})" if version else path
    return HostCheck(name=name, ok=True, detail=detail, fix=None, required=required)


def _packer_check() -> HostCheck:
    path = which("packer")
    if not path:
        return HostCheck(
            name="packer",
            ok=False,
            detail="packer not found on PATH",
            fix=install_command(["packer"]),
            required=True,
        )
    version = packer_version()
    if version is None:
        return HostCheck(
            name="packer",
            ok=False,
            detail=f"{path} reports no version from `packer version` (not HashiCorp Packer?)",
            fix=install_command(["packer"]),
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
    evidence = kvm.kvm_probe()
    if evidence["booted"]:
        detail = f"KVM boots a kernel ({evidence['seconds']:.1f} s); builds use -accel kvm"
    else:
        detail = f"KVM unusable, builds fall back to TCG (slower): {evidence['reason']}"
    return HostCheck(name="kvm", ok=evidence["booted"], detail=detail, fix=None, required=False)
