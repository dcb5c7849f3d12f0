"""Build step 4a: assemble the conda environments on the host, into the base image.

Without KVM the build VM runs every instruction emulated, several times slower than the host,
and the conda stage (`provisioners/20-conda-envs.sh`) only unpacks, links and copies files. So
that stage runs here at native speed: the base image is grown to the profile's disk, its root
file system is mounted, and the same script runs in a chroot with the image's own python3 and
the payload at the same path as inside the VM. Packer then boots the result as its base and
runs the other stages. Needs root (loop devices), as the Debian base image does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from factory import host
from factory.base import _Runner, _signals_deferred, _teardown, chroot_command

HOST_STAGE = "20-conda-envs.sh"
PAYLOAD_IN_IMAGE = "tmp/factory-payload"
_TOOLS = {  # command -> Debian package that provides it
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "chroot": "coreutils",
    "sfdisk": "fdisk",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "qemu-img": "qemu-utils",
}
_LINUX_TYPES = {"83", "0fc63daf-8483-4772-8e79-3d69d8477de4"}


def check_host() -> None:
    """Refuse, in one line, a host that cannot mount the image."""
    host.require_root_and_tools(
        "building",
        "the conda environments are installed into the image on this host: loop device, "
        "mount, chroot",
        _TOOLS,
        "run factory as root (sudo -E factory ...)",
    )


def _root_partition(run: _Runner, raw: Path) -> tuple[int, dict, int]:
    """(partition number, sfdisk entry, sector size) of the image's root file system: the
    largest Linux partition."""
    table = json.loads(run("sfdisk", "--json", str(raw), capture=True))["partitiontable"]
    parts = [p for p in table["partitions"] if str(p.get("type", "")).lower() in _LINUX_TYPES]
    if not parts:
        parts = table["partitions"]
    root = max(parts, key=lambda p: p["size"])
    number = int(root["node"].rsplit(str(raw.name), 1)[-1].lstrip("p"))
    return number, root, table.get("sectorsize", 512)


def _grow(run: _Runner, raw: Path, disk_gib: int) -> None:
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


def assemble_environments(
    base_image: Path,
    disk_gib: int,
    build_dir: Path,
    work: Path,
    log: Callable[[str], None],
    log_file: Path,
) -> Path:
    """Return a qcow2: `base_image` grown to `disk_gib` with the conda stage already run."""
    raw, mnt, result = work / "assemble.raw", work / "assemble-root", work / "assembled.qcow2"
    with open(log_file, "a") as logf:
        run = _Runner(logf, log_file, log)
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
            payload = mnt / PAYLOAD_IN_IMAGE
            payload.mkdir(parents=True, exist_ok=True)
            for source, target, extra in (
                ("/dev", mnt / "dev", ["--bind"]),
                ("proc", mnt / "proc", ["-t", "proc"]),
                ("sysfs", mnt / "sys", ["-t", "sysfs"]),
                (str(build_dir / "payload"), payload, ["--bind"]),
            ):
                run("mount", *extra, source, str(target))
                mounts.append(target)
            run.step("installing the conda environments on the host (native speed)")
            script = (build_dir / "provisioners" / HOST_STAGE).read_text()
            run(*chroot_command(mnt), f"FACTORY_PAYLOAD=/{PAYLOAD_IN_IMAGE}", "bash", "-s",
                input=script)  # fmt: skip
            shutil.rmtree(mnt / "var/cache/factory-rattler", ignore_errors=True)
            run("sync")
        finally:
            with _signals_deferred():
                _teardown(run, mounts, loops)
        run.step("writing the assembled image")
        run("qemu-img", "convert", "-O", "qcow2", str(raw), str(result))
        raw.unlink()
    return result
