"""Edit a delivered image's root file system from the host (loop device, root only), to make
images with one protection removed for negative tests."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def mounted_root(raw: Path) -> Iterator[Path]:
    """Mount the first partition of a raw disk image read-write."""
    table = json.loads(run("sfdisk", "-J", str(raw)))["partitiontable"]
    part = table["partitions"][0]
    sector = table.get("sectorsize", 512)
    loop = run(
        "losetup",
        "-f",
        "--show",
        "-o",
        str(part["start"] * sector),
        "--sizelimit",
        str(part["size"] * sector),
        str(raw),
    ).strip()
    mount = Path(tempfile.mkdtemp(prefix="factory-edit-"))
    try:
        run("mount", loop, str(mount))
        try:
            yield mount
        finally:
            run("umount", str(mount))
    finally:
        run("losetup", "-d", loop)
        mount.rmdir()


def raw_copy(qcow2: Path, dest: Path) -> Path:
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(dest))
    return dest
