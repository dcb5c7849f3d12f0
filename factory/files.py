"""Writing files so that a reader sees the old version or the new one, never half of one, and
the locks that keep two factory processes from writing one thing at the same time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from factory.errors import FactoryError


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A scratch directory inside out_dir (same filesystem, so os.replace is atomic).

    It is removed on the way out whatever happens, KeyboardInterrupt included; callers move
    their finished artifacts out of it before leaving the block.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".scratch-", dir=out_dir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomically(path: Path, text: str, mode: int | None = None) -> Path:
    """Write `text` to `path` through a scratch file beside it, then one rename."""
    return write_bytes_atomically(path, text.encode("utf-8"), mode)


def write_bytes_atomically(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` through a scratch file beside it (in a folder only its owner
    can enter, so a private file is never readable by others), then one rename."""
    with staging_dir(path.parent) as staging:
        scratch = staging / path.name
        scratch.write_bytes(data)
        if mode is not None:
            scratch.chmod(mode)
        os.replace(scratch, path)
    return path


def remove_path(path: Path) -> None:
    """Remove a file, a link or a whole folder (never a link's target); a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(new: Path, final: Path) -> None:
    """Put `new` (a file or a folder, on the same filesystem) at `final` in one rename.

    A reader finds the old version or the new one, never a half-written one. A folder cannot
    be renamed over another, so an old folder is renamed aside first and removed afterwards.
    """
    if new.is_dir() and not new.is_symlink():
        replaced = None
        if final.exists() or final.is_symlink():
            replaced = final.with_name(f".replaced-{final.name}-{os.getpid()}")
            final.rename(replaced)
        new.rename(final)
        if replaced is not None:
            remove_path(replaced)
        return
    os.replace(new, final)


@contextlib.contextmanager
def file_lock(
    path: Path, *, wait: bool, busy: str, log: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block.

    wait=False refuses at once with FactoryError(busy) when another process holds it;
    wait=True logs `busy` once and blocks until the lock is free. The lock file is opened
    without following a link and without truncating it, since it may sit in a shared folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise FactoryError(
            f"cannot open the lock {path}: {error.strerror}; remove it if it is a link"
        ) from None
    with open(descriptor, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise FactoryError(busy) from None
            log(busy)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
