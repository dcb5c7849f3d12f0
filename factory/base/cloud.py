"""A profile's cloud image as the base: downloaded once, verified, cached under its sha256."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from factory import cache
from factory.download import ChecksumMismatch, Unreachable, fetch_verified
from factory.errors import FactoryError

DOWNLOAD_SCHEMES = ("http", "https", "file")
_IMAGE_SUFFIXES = (".qcow2", ".img", ".raw", ".vmdk")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


def cloud_base_image(
    url: str, sha256: str, log: Callable[[str], None] = print, build: bool = True
) -> Path:
    """Download (http/https/file URL) into the cache, verify sha256, return the cached path
    (with build=False: only the path, which may not exist yet)."""
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256.strip()):
        raise FactoryError(
            f"base.sha256: {sha256!r} is not a sha256 (64 hex digits); "
            "copy it from the image's SHA256SUMS file"
        )
    sha256 = sha256.strip().lower()
    parts = urllib.parse.urlsplit(url if isinstance(url, str) else "")
    if parts.scheme not in DOWNLOAD_SCHEMES or not (parts.netloc or parts.path):
        raise FactoryError(
            f"base.url: {url!r} is not an http://, https:// or file:// URL; "
            "fix the image URL in the profile"
        )
    suffix = Path(urllib.parse.unquote(parts.path)).suffix.lower()
    if suffix not in _IMAGE_SUFFIXES:
        suffix = ".qcow2"
    target = cache.cache_subdir(cache.DOWNLOADS) / f"{sha256}{suffix}"
    if not build:
        return target
    if target.exists():
        if cache.sha256_file(target) == sha256:
            return target
        log(f"cached download {target.name} is corrupt (sha256 mismatch); downloading again")
        target.unlink()
    try:
        fetch_verified(url, sha256, target, what="the base image", log=log)
    except Unreachable as error:
        raise FactoryError(
            f"base.url: {error}; check the URL in the profile and the network"
        ) from None
    except ChecksumMismatch as error:
        raise FactoryError(
            f"base.sha256: checksum mismatch for {url}: expected {sha256}, got {error.actual}; "
            "check the URL and the sha256 in the profile"
        ) from None
    log(f"verified sha256 of {url}: {target}")
    return target
