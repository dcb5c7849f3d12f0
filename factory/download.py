"""One verified download with one retry policy: cloud images, conda packages, wheels and
conda installers all arrive through fetch_verified.

Each download goes to its own temporary file beside the destination and is renamed into place
only after its sha256 matched, so two processes fetching one file never see each other's half.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from factory.cache import cache_subdir, sha256_file
from factory.errors import FactoryError

ATTEMPTS = 4  # the first try and three retries
BACKOFF_SECONDS = 1.0  # doubled after every failed attempt
TIMEOUT_SECONDS = 60
_CHUNK = 1 << 20
T = TypeVar("T")
# Errors of the local disk, never of the network: retrying cannot help.
LOCAL_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class Unreachable(FactoryError):
    """The file could not be fetched (network, server or path)."""

    def __init__(self, what: str, url: str, reason: str) -> None:
        super().__init__(f"cannot download {what} from {url}: {reason}")
        self.what, self.url, self.reason = what, url, reason


class ChecksumMismatch(FactoryError):
    """The file arrived, but its sha256 is not the one it is pinned to."""

    def __init__(self, what: str, url: str, expected: str, actual: str) -> None:
        super().__init__(f"{what} from {url} has sha256 {actual}, expected {expected}")
        self.what, self.url, self.expected, self.actual = what, url, expected, actual


def local_write_error(error: BaseException, dest: Path) -> FactoryError | None:
    """A one-line error when `error` came from writing `dest` on this machine."""
    if isinstance(error, OSError) and error.errno in LOCAL_WRITE_ERRORS:
        return FactoryError(
            f"cannot write {dest}: {os.strerror(error.errno)}; free space or fix permissions "
            f"under {dest.parent}"
        )
    return None


def _retryable(error: BaseException) -> bool:
    """Connection trouble, 5xx and 429 may pass; any other HTTP answer will not."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code == 429
    return True


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    return str(getattr(error, "reason", None) or error)


def _with_retries(url: str, what: str, consume: Callable[[IO[bytes]], T], dest: Path | None) -> T:
    """Open `url` and hand the response to `consume`, under the one retry policy."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "factory"})
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                return consume(response)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            local = local_write_error(error, dest) if dest is not None else None
            if local is not None:
                raise local from None
            # A local file will not appear by waiting.
            final = url.startswith("file:") or not _retryable(error) or attempt == ATTEMPTS
            if final:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise Unreachable(what, url, _reason(error) + tries) from None
        time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
    raise AssertionError("unreachable: the loop returns or raises")


def stream_to(url: str, dest: Path, what: str) -> str:
    """Copy `url` into `dest` with the retry policy; return the sha256 of what arrived."""

    def copy(response: IO[bytes]) -> str:
        digest = hashlib.sha256()
        with open(dest, "wb") as out:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        return digest.hexdigest()

    return _with_retries(url, what, copy, dest)


def fetch_bytes(url: str, *, what: str) -> bytes:
    """A small file (an index, a release file) read into memory, under the same retry policy;
    raises Unreachable."""
    return _with_retries(url, what, lambda response: response.read(), None)


def fetch_verified(
    url: str, sha256: str, dest: Path, *, what: str, log: Callable[[str], None] = print
) -> Path:
    """`dest`, holding the file at `url` whose sha256 is `sha256`.

    An existing `dest` with that sha256 is returned at once; otherwise the file is downloaded
    (http, https or file URL) to a temporary name beside `dest`, checked, and renamed into place.
    Raises Unreachable or ChecksumMismatch, whose messages name `what` and the URL.
    """
    sha256 = sha256.lower()
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {what} from {url}")
    handle, partial_name = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=".part", dir=dest.parent
    )
    os.close(handle)
    partial = Path(partial_name)
    try:
        actual = stream_to(url, partial, what)
        if actual != sha256:
            raise ChecksumMismatch(what, url, sha256, actual)
        partial.chmod(0o644)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def fetch_locked(url: str, sha256: str, folder: str) -> Path:
    """A cached copy of a file a lock names (conda package, wheel), under
    <cache>/<folder>/<sha256>/<name>, verified against the lock's sha256."""
    name = url.rsplit("/", 1)[-1]
    dest = cache_subdir(folder) / sha256 / name
    try:
        return fetch_verified(url, sha256, dest, what=name, log=lambda _: None)
    except ChecksumMismatch as error:
        raise FactoryError(
            f"{name}: sha256 mismatch (lock {sha256[:12]}…, got {error.actual[:12]}…); "
            "its index changed: run `factory lock --force`"
        ) from None
