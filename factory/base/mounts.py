"""Mount bookkeeping for the work folders that hold a mounted image."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def mounts_under(path: Path) -> list[str]:
    """The mount points at or below `path`."""
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mounts") as handle:
        for line in handle:
            point = line.split()[1].replace("\\040", " ")
            if point.startswith(prefix) or point == prefix[:-1]:
                found.append(point)
    return found


def is_mounted(point: Path) -> bool:
    return str(point.resolve()) in mounts_under(point)


def remove_unless_mounted(workdir: Path, log: Callable[[str], None]) -> None:
    """Remove a work folder, but never across a mount point: a leftover bind mount of /dev
    would empty the host's."""
    busy = mounts_under(workdir)
    if busy:
        log(f"not removing {workdir}: still mounted: {', '.join(busy)}; unmount, then delete it")
        return
    shutil.rmtree(workdir, ignore_errors=True)
