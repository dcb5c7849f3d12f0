"""Build step 4a: on the host, upgrade the base image from its security suite and assemble
the conda environments into it.

Without KVM the build VM runs every instruction emulated, several times slower than the host,
and the conda stage (`provisioners/20-conda-envs.sh`) only unpacks, links and copies files. So
that stage runs here at native speed: the base image is grown to the profile's disk, its root
file system is mounted, and the same script runs in a chroot with the image's own python3 and
the payload at the same path as inside the VM. Before that, apt upgrades the image in the same
chroot with the host's network, so offline builds are patched too, and the security index it
used is kept for the delivery. Packer then boots the result as its base and runs the other
stages. Needs root (loop devices), as the Debian base image does.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from debian.debian_support import version_compare

from factory import image_layout, updates
from factory.base.recipe import chroot_command, clear_apt_lists, grub_cfg, teardown
from factory.processes import LoggedRunner, signals_deferred
from factory.tools import require_root_and_tools

HOST_STAGE = "20-conda-envs.sh"
_APT = ("apt-get", "-q", "-y")  # chroot_command sets DEBIAN_FRONTEND
_TOOLS = ("losetup", "mount", "umount", "chroot", "sfdisk", "e2fsck", "resize2fs", "qemu-img")
_LINUX_TYPES = {"83", "0fc63daf-8483-4772-8e79-3d69d8477de4"}


def check_host() -> None:
    """Refuse, in one line, a host that cannot mount the image."""
    require_root_and_tools(
        "building",
        "the conda environments are installed into the image on this host: loop device, "
        "mount, chroot",
        _TOOLS,
        "run factory as root (sudo -E factory ...)",
    )


def _root_partition(run: LoggedRunner, raw: Path) -> tuple[int, dict, int]:
    """(partition number, sfdisk entry, sector size) of the image's root file system: the
    largest Linux partition."""
    table = json.loads(run("sfdisk", "--json", str(raw), capture=True))["partitiontable"]
    parts = [p for p in table["partitions"] if str(p.get("type", "")).lower() in _LINUX_TYPES]
    if not parts:
        parts = table["partitions"]
    root = max(parts, key=lambda p: p["size"])
    number = int(root["node"].rsplit(str(raw.name), 1)[-1].lstrip("p"))
    return number, root, table.get("sectorsize", 512)


def _grow(run: LoggedRunner, raw: Path, disk_gib: int) -> None:
    """Grow the disk to `disk_gib` and its root partition to fill it, when it is the last one."""
    if raw.stat().st_size >= disk_gib << 30:
        return
    with open(raw, "r+b") as handle:
        handle.truncate(disk_gib << 30)
    table = json.loads(run("sfdisk", "--json", str(raw), capture=True))["partitiontable"]
    if table["label"] == "gpt":
        run("sfdisk", "--relocate", "gpt-bak-std", str(raw))
    number, root, _ = _root_partition(run, raw)
    if root["start"] != max(p["start"] for p in table["partitions"]):
        run.note("the root partition is not the last one; left at its size")
        return
    run("sfdisk", "--no-reread", "--no-tell-kernel", "-N", str(number), str(raw), input=", +\n")


def _kernels(mnt: Path) -> set[str]:
    return {path.name.removeprefix("vmlinuz-") for path in (mnt / "boot").glob("vmlinuz-*")}


def upgrade(run: LoggedRunner, mnt: Path) -> updates.SecurityIndex | None:
    """apt full-upgrade in the image mounted at `mnt` (its proc, sys and dev mounted); the
    security index it upgraded against, or None when its sources have no security suite."""
    policy = mnt / "usr/sbin/policy-rc.d"
    # /etc/resolv.conf points here; /run is a tmpfs for the upgrade's length.
    resolver = mnt / "run/systemd/resolve/stub-resolv.conf"
    resolver.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolver)
    policy.write_text("#!/bin/sh\n# factory: no service starts in the build chroot\nexit 101\n")
    policy.chmod(0o755)
    kernels = _kernels(mnt)
    try:
        run(*chroot_command(mnt), *_APT, "update")
        run(*chroot_command(mnt), *_APT, "-o", "Dpkg::Options::=--force-confold", "full-upgrade")
        codename = re.search(r"^VERSION_CODENAME=(\S+)", (mnt / "etc/os-release").read_text(), re.M)
        index = updates.read_apt_lists(
            mnt / "var/lib/apt/lists", codename.group(1) if codename else ""
        )
        run(*chroot_command(mnt), *_APT, "clean")
    finally:
        policy.unlink(missing_ok=True)
        clear_apt_lists(mnt)
    new_kernels = _kernels(mnt) - kernels
    grub = mnt / "boot/grub/grub.cfg"
    config = grub.read_text() if grub.exists() else ""
    if new_kernels and config.startswith("# Written by factory"):
        # update-grub on a loop device writes no kernel entries: write ours for the new one.
        root_uuid = re.search(r"--set=root (\S+)", config)
        kernel = max(new_kernels, key=functools.cmp_to_key(version_compare))
        if root_uuid:
            grub.write_text(grub_cfg(root_uuid.group(1), kernel))
            run.note(f"new kernel {kernel}: boot entry rewritten")
    return index


def assemble_environments(
    base_image: Path,
    disk_gib: int,
    build_dir: Path,
    work: Path,
    log: Callable[[str], None],
    log_file: Path,
) -> Path:
    """Return a qcow2: `base_image` grown to `disk_gib`, upgraded from its security suite, with
    the conda stage already run. The security index used is written to work/security-index.json
    (null when the image has no security suite)."""
    raw, mnt, result = work / "assemble.raw", work / "assemble-root", work / "assembled.qcow2"
    with open(log_file, "a") as logf:
        run = LoggedRunner(logf, log_file, log)
        run.step("copying the base image for the host-side environments")
        run("qemu-img", "convert", "-O", "raw", str(base_image), str(raw))
        _grow(run, raw, disk_gib)
        _, root, sector = _root_partition(run, raw)
        loops: list[str] = []
        mounts: list[Path] = []
        try:
            loop = run(
                "losetup", "-f", "--show", "-o", str(root["start"] * sector),
                "--sizelimit", str(root["size"] * sector), str(raw), capture=True,
            ).strip()  # fmt: skip
            loops.append(loop)
            run("e2fsck", "-f", "-y", loop, check=False)
            run("resize2fs", loop)
            mnt.mkdir()
            run("mount", loop, str(mnt))
            mounts.append(mnt)
            payload = mnt / image_layout.PAYLOAD_DIR.relative_to("/")
            payload.mkdir(parents=True, exist_ok=True)
            for source, target, extra in (
                ("/dev", mnt / "dev", ["--bind"]),
                ("proc", mnt / "proc", ["-t", "proc"]),
                ("sysfs", mnt / "sys", ["-t", "sysfs"]),
                ("tmpfs", mnt / "run", ["-t", "tmpfs"]),
                (str(build_dir / "payload"), payload, ["--bind"]),
            ):
                run("mount", *extra, source, str(target))
                mounts.append(target)
            run.step("upgrading the image from its security suite (on the host)")
            index = upgrade(run, mnt)
            (work / updates.INDEX_FILE).write_text(
                json.dumps(index.to_json() if index else None, indent=1) + "\n"
            )
            if index is None:
                run.step("the image's apt sources name no security suite: it is not patched")
            else:
                run.step(f"upgraded against {index.suite} of {index.date}")
            run.step("installing the conda environments on the host (native speed)")
            script = (build_dir / "provisioners" / HOST_STAGE).read_text()
            run(*chroot_command(mnt), f"FACTORY_PAYLOAD={image_layout.PAYLOAD_DIR}", "bash", "-s",
                input=script)  # fmt: skip
            shutil.rmtree(mnt / "var/cache/factory-rattler", ignore_errors=True)
            run("sync")
        finally:
            with signals_deferred():
                teardown(run, mounts, loops)
        run.step("writing the assembled image")
        run("qemu-img", "convert", "-O", "qcow2", str(raw), str(result))
        raw.unlink()
    return result
