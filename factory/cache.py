"""The factory cache directory: base images, channels and probes, keyed by their inputs, and
downloads stored under their sha256."""

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from factory.errors import FactoryError

CACHE_ENV_VAR = "FACTORY_CACHE_DIR"
_override: Path | None = None


def set_cache_dir(path: Path | None) -> None:
    """Override the cache directory (the CLI's --cache-dir)."""
    global _override
    _override = Path(path).expanduser().resolve() if path else None


def cache_dir() -> Path:
    """Return the cache directory: --cache-dir, then $FACTORY_CACHE_DIR, then ~/.cache/factory."""
    if _override is not None:
        path = _override
    elif os.environ.get(CACHE_ENV_VAR):
        path = Path(os.environ[CACHE_ENV_VAR]).expanduser().resolve()
    else:
        path = Path.home() / ".cache" / "factory"
    path.mkdir(parents=True, exist_ok=True)
    return path


def inputs_key(inputs: object) -> str:
    """A short stable hash of JSON-serialisable inputs, used to key cache entries."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Errors of the local disk, never of the network: retrying cannot help.
LOCAL_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def local_write_error(error: BaseException, dest: Path) -> FactoryError | None:
    """A one-line error when `error` came from writing `dest` on this machine."""
    if isinstance(error, OSError) and error.errno in LOCAL_WRITE_ERRORS:
        return FactoryError(
            f"cannot write {dest}: {os.strerror(error.errno)}; free space or fix permissions "
            f"under {dest.parent}"
        )
    return None


def download(url: str, dest: Path, attempts: int = 3) -> None:
    """Fetch `url` into `dest`, retrying with backoff; one-line FactoryError when it fails."""
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
                shutil.copyfileobj(response, out)
            return
        except OSError as error:
            local = local_write_error(error, dest)
            if local is not None:
                raise local from None
            if attempt == attempts:
                raise FactoryError(f"cannot download {url}: {error}; check the network") from None
            time.sleep(2**attempt)


def fetch_verified(
    url: str,
    sha256: str,
    folder: str,
    mismatch: Callable[[str, str], str],
    unreachable: Callable[[str], str] = str,
    log: Callable[[str], None] | None = None,
) -> Path:
    """A cached copy of `url` under cache_dir()/folder/<sha256>/, verified against its sha256.
    `mismatch(name, actual)` words the error when the download differs, `unreachable(message)`
    when it fails. Concurrent fetches of one file each write their own partial file."""
    name = url.rsplit("/", 1)[-1]
    cached = cache_dir() / folder / sha256 / name
    if cached.exists() and sha256_file(cached) == sha256:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    if log is not None:
        log(f"downloading {name}")
    handle, partial_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cached.parent)
    os.close(handle)
    partial = Path(partial_name)
    try:
        try:
            download(url, partial)
        except FactoryError as error:
            raise FactoryError(unreachable(str(error))) from None
        actual = sha256_file(partial)
        if actual != sha256:
            raise FactoryError(mismatch(name, actual))
        partial.chmod(0o644)
        partial.replace(cached)
    finally:
        partial.unlink(missing_ok=True)
    return cached


def fetch_locked(url: str, sha256: str, folder: str) -> Path:
    """A cached copy of a file a lock names (conda package, wheel), verified against the
    lock's sha256."""
    return fetch_verified(
        url,
        sha256,
        folder,
        lambda name, actual: (
            f"{name}: sha256 mismatch (lock {sha256[:12]}…, got {actual[:12]}…); "
            "its index changed: run `factory lock --force`"
        ),
    )
