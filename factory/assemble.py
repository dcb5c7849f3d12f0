"""Work on an image's files from the build host, at native speed.

A layer is a qcow2 overlay. `mounted` exports it as a raw file through FUSE
(qemu-storage-daemon), attaches its root partition to a loop device and mounts it with /dev,
/proc, /sys, a tmpfs /run and the build payload, so that the provisioner scripts run in a
chroot with the image's own python3, as they would in the VM. Writes land in the overlay
only; its parent is never touched. Needs root (loop devices, mount, chroot).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from debian.debian_support import version_compare

from factory import image_layout, updates
from factory.base.mounts import is_mounted
from factory.base.recipe import chroot_command, clear_apt_lists, grub_cfg, teardown
from factory.errors import FactoryError
from factory.files import remove_path
from factory.processes import LoggedRunner, die_with_parent, signals_deferred, stop
from factory.tools import require_root_and_tools

_APT = ("apt-get", "-q", "-y")  # chroot_command sets DEBIAN_FRONTEND
_TOOLS = (
    "losetup", "mount", "umount", "chroot", "sfdisk", "e2fsck", "resize2fs", "fstrim",
    "qemu-img", "qemu-storage-daemon",
)  # fmt: skip
_LINUX_TYPES = {"83", "0fc63daf-8483-4772-8e79-3d69d8477de4"}
# What the host stages leave behind that no image should carry.
_HOST_LEFTOVERS = (
    "var/cache/factory-rattler", "root/.cache", "root/.conda", "root/.python_history",
    "root/.bash_history", "root/.wget-hsts",
)  # fmt: skip


def check_host() -> None:
    """Refuse, in one line, a host that cannot mount the image."""
    require_root_and_tools(
        "building",
        "the image's layers are made on this host: FUSE export, loop device, mount, chroot",
        _TOOLS,
        "run factory as root (sudo -E factory ...)",
    )


def new_overlay(
    run: LoggedRunner, parent: Path, overlay: Path, size_gib: int | None = None
) -> Path:
    """An empty qcow2 on top of `parent` (a layer, or a base image in any format qemu reads),
    optionally larger than it."""
    size = [f"{size_gib}G"] if size_gib else []
    parent_format = json.loads(run("qemu-img", "info", "--output=json", str(parent),
                                   capture=True))["format"]  # fmt: skip
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(parent), "-F", parent_format,
        str(overlay), *size)  # fmt: skip
    return overlay


def _root_partition(run: LoggedRunner, raw: Path) -> tuple[int, dict, int, dict]:
    """(partition number, sfdisk entry, sector size, table) of the image's root file system:
    the largest Linux partition."""
    table = json.loads(run("sfdisk", "--json", str(raw), capture=True))["partitiontable"]
    parts = [p for p in table["partitions"] if str(p.get("type", "")).lower() in _LINUX_TYPES]
    root = max(parts or table["partitions"], key=lambda p: p["size"])
    number = int(root["node"].rsplit(str(raw.name), 1)[-1].lstrip("p"))
    return number, root, table.get("sectorsize", 512), table


def _grow_root(run: LoggedRunner, raw: Path) -> bool:
    """Grow the root partition to the end of the (already larger) disk when it is the last
    partition; return whether it grew."""
    number, root, sector, table = _root_partition(run, raw)
    if table["label"] == "gpt":
        run("sfdisk", "--relocate", "gpt-bak-std", str(raw))
    if root["start"] != max(p["start"] for p in table["partitions"]):
        run.note("the root partition is not the last one; left at its size")
        return False
    if (root["start"] + root["size"]) * sector >= raw.stat().st_size - (1 << 20):
        return False
    run("sfdisk", "--no-reread", "--no-tell-kernel", "-N", str(number), str(raw), input=", +\n")
    return True


class _Export:
    """A qcow2 shown as a raw file by qemu-storage-daemon's FUSE export, while the block runs.
    Zero writes and discards become zero clusters in the overlay, so a trimmed file system
    exports small."""

    def __init__(self, run: LoggedRunner, image: Path, raw: Path) -> None:
        if "," in str(raw):
            raise FactoryError(f"{raw}: a path with a comma cannot be exported; move the cache")
        self.run, self.raw = run, raw
        raw.touch()
        file_node = {"driver": "file", "node-name": "file0", "filename": str(image),
                     "discard": "unmap"}  # fmt: skip
        disk_node = {"driver": "qcow2", "node-name": "disk0", "file": "file0",
                     "discard": "unmap", "detect-zeroes": "unmap"}  # fmt: skip
        command = [
            "qemu-storage-daemon",
            "--blockdev", json.dumps(file_node),
            "--blockdev", json.dumps(disk_node),
            "--export", f"type=fuse,id=export0,node-name=disk0,mountpoint={raw},writable=on",
        ]  # fmt: skip
        run.note("$ " + " ".join(command))
        self.process = subprocess.Popen(
            command, stdout=run.logf, stderr=run.logf, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + 30
        while not is_mounted(raw):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise FactoryError(
                    f"qemu-storage-daemon could not export {image} (is /dev/fuse there?); "
                    f"full log: {run.logfile}"
                )
            time.sleep(0.1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stop(self.process, group=False, grace=5)
        if is_mounted(self.raw):
            self.run("umount", "--lazy", str(self.raw), check=False)
        self.raw.unlink(missing_ok=True)
        if self.process.returncode not in (0, None):
            raise FactoryError(
                f"qemu-storage-daemon exited {self.process.returncode} writing the layer; "
                f"full log: {self.run.logfile}"
            )


@contextlib.contextmanager
def mounted(
    run: LoggedRunner, image: Path, work: Path, payload: Path | None = None, grow: bool = False
) -> Iterator[Path]:
    """The image's root file system, mounted read-write for a chroot, under `work`."""
    export = _Export(run, image, work / "disk.raw")
    mnt = work / "root"
    loops: list[str] = []
    mounts: list[Path] = []
    try:
        grown = grow and _grow_root(run, export.raw)
        _, root, sector, _ = _root_partition(run, export.raw)
        loop = run(
            "losetup", "-f", "--show", "-o", str(root["start"] * sector),
            "--sizelimit", str(root["size"] * sector), str(export.raw), capture=True,
        ).strip()  # fmt: skip
        loops.append(loop)
        if grown:
            run("e2fsck", "-f", "-y", loop, check=False)
            run("resize2fs", loop)
        mnt.mkdir(exist_ok=True)
        run("mount", loop, str(mnt))
        mounts.append(mnt)
        binds = [
            ("/dev", mnt / "dev", ["--bind"]),
            ("proc", mnt / "proc", ["-t", "proc"]),
            ("sysfs", mnt / "sys", ["-t", "sysfs"]),
            ("tmpfs", mnt / "run", ["-t", "tmpfs"]),
        ]
        if payload is not None:
            target = mnt / image_layout.PAYLOAD_DIR.relative_to("/")
            target.mkdir(parents=True, exist_ok=True)
            binds.append((str(payload), target, ["--bind"]))
        for source, target, extra in binds:
            run("mount", *extra, source, str(target))
            mounts.append(target)
        yield mnt
        run("sync")
    finally:
        with signals_deferred():
            teardown(run, mounts, loops)
            export.close()


def run_script(run: LoggedRunner, mnt: Path, script: Path, *args: str) -> None:
    """Run a provisioner script in the image's chroot, with the payload where the VM has it."""
    run(*chroot_command(mnt), f"FACTORY_PAYLOAD={image_layout.PAYLOAD_DIR}", "bash", "-s",
        "--", *args, input=script.read_text())  # fmt: skip


def seal(run: LoggedRunner, mnt: Path) -> None:
    """Remove what the host stages left (caches, the payload's mount point, temporary files),
    then discard the file system's free blocks so that the export skips them."""
    for name in _HOST_LEFTOVERS:
        remove_path(mnt / name)
    for folder in (mnt / "tmp", mnt / "var/tmp"):
        for entry in folder.iterdir() if folder.is_dir() else ():
            if not is_mounted(entry):
                remove_path(entry)
    run("sync")  # ext4 trims only blocks whose release is committed
    run("fstrim", "-v", str(mnt), check=False)


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
