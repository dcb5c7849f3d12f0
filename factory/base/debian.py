"""The locally built Debian base image, cached under a key of everything that makes it: the
release, the mirror, the security suite's current index, the packages and the recipe's text."""

from __future__ import annotations

import datetime
import hashlib
import json
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from factory import cache, updates
from factory.base import recipe
from factory.base.mounts import remove_unless_mounted
from factory.cache import inputs_key, sha256_file
from factory.errors import FactoryError
from factory.files import file_lock, replace_path
from factory.processes import LoggedRunner, signals_as_exceptions
from factory.tools import require_root_and_tools

DEBIAN_RELEASES = {
    "debian-12": {"suite": "bookworm", "mirror": "http://deb.debian.org/debian"},
}
MIRROR_SCHEMES = ("http", "https", "file")
# Bump when the recipe changes in a way its text cannot show (e.g. a tool it runs changed).
RECIPE_VERSION = "1"
# What the recipe runs on this host.
BUILD_TOOLS = ("mmdebstrap", "sfdisk", "losetup", "mount", "umount", "mkfs.ext4", "tar")
BUILD_TOOLS += ("chroot", "qemu-img")

Log = Callable[[str], None]


def recipe_fingerprint(source: Path = Path(recipe.__file__)) -> str:
    """A hash of the recipe file's whole text, so that any edit to it rebuilds the image."""
    try:
        text = source.read_bytes()
    except OSError:
        return RECIPE_VERSION  # no source shipped: the version alone
    return f"{RECIPE_VERSION}-{hashlib.sha256(text).hexdigest()[:12]}"


def debian_base_image(
    release: str = "debian-12",
    mirror: str | None = None,
    log: Log = print,
    rebuild: bool = False,
    extra_packages: tuple[str, ...] = (),
    build: bool = True,
) -> Path:
    """Return the cached qcow2 for a locally built Debian base, building it if absent (with
    build=False: only its path, which may not exist yet). `extra_packages` make a separate
    layer (e.g. the GPU driver, built by DKMS for the image's kernel while the base is made)."""
    if release not in DEBIAN_RELEASES:
        known = ", ".join(sorted(DEBIAN_RELEASES))
        raise FactoryError(f"base.release: unknown release {release!r}; use one of: {known}")
    suite = DEBIAN_RELEASES[release]["suite"]
    mirror = (mirror or DEBIAN_RELEASES[release]["mirror"]).rstrip("/")
    if urllib.parse.urlsplit(mirror).scheme not in MIRROR_SCHEMES:
        raise FactoryError(
            f"base.mirror: {mirror!r} is not an http://, https:// or file:// URL; "
            "give the URL of a Debian mirror"
        )
    components = recipe.COMPONENTS.split(",")
    inputs = {
        "release": release,
        "suite": suite,
        "mirror": mirror,
        "sources": updates.apt_sources(mirror, suite, components),
        # A newly published security update makes a new base layer.
        "security_index": updates.index_state(mirror, suite, components),
        "components": recipe.COMPONENTS,
        "packages": sorted({*recipe.DEBIAN_PACKAGES, *extra_packages}),
        "disk_size_gib": recipe.DISK_SIZE_GIB,
        "kernel_cmdline": recipe.KERNEL_CMDLINE,
        "recipe": recipe_fingerprint(),
    }
    base_dir = cache.cache_subdir(cache.BASE)
    name = f"{release}-{inputs_key(inputs)}"
    image = base_dir / f"{name}.qcow2"
    sidecar = base_dir / f"{name}.json"
    if not build:
        return image
    if not rebuild and _cached_ok(image, sidecar, log):
        return image

    check_build_host()
    busy = f"waiting for another build of {name} to finish"
    with file_lock(base_dir / f"{name}.lock", wait=True, busy=busy, log=log):
        # Another process may have built it while we waited for the lock.
        if not rebuild and _cached_ok(image, sidecar, log, quiet=True):
            return image
        for stale in (sidecar, image):
            stale.unlink(missing_ok=True)
        _remove_stale_workdirs(base_dir, name, log)
        workdir = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=base_dir))
        try:
            with signals_as_exceptions():
                return _build_into_cache(workdir, name, release, inputs, log)
        finally:
            remove_unless_mounted(workdir, log)


def _build_into_cache(workdir: Path, name: str, release: str, inputs: dict, log: Log) -> Path:
    """Run the recipe in `workdir`, then move the image and its sidecar into the cache."""
    base_dir = workdir.parent
    image, sidecar, logfile = (base_dir / f"{name}{ext}" for ext in (".qcow2", ".json", ".log"))
    started = time.monotonic()
    log(f"{release}: building base image (full log: {logfile})")
    with open(logfile, "w", encoding="utf-8") as logf:
        runner = LoggedRunner(logf, logfile, log)
        built = recipe.build_disk(
            workdir, inputs["suite"], inputs["sources"], runner, inputs["packages"]
        )
        seconds = round(time.monotonic() - started, 1)
        log(f"{release}: checksumming the image")
        meta = {
            "name": name,
            "inputs": inputs,
            "sha256": sha256_file(built),
            "size": built.stat().st_size,
            "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "build_seconds": seconds,
            "kernel": runner.facts.get("kernel"),
            "root_uuid": runner.facts.get("root_uuid"),
            "log": str(logfile),
        }
        tmp_sidecar = workdir / "sidecar.json"
        tmp_sidecar.write_text(json.dumps(meta, indent=2) + "\n")
        # qcow2 first, sidecar last: an entry without a sidecar is never reused.
        replace_path(built, image)
        replace_path(tmp_sidecar, sidecar)
    log(f"{release}: built {image} in {seconds:.0f} s ({meta['size'] >> 20} MiB)")
    return image


def _cached_ok(image: Path, sidecar: Path, log: Log, quiet: bool = False) -> bool:
    if not image.exists():
        return False
    try:
        meta = json.loads(sidecar.read_text())
        expected = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        if not quiet:
            log(f"cached base image {image.name} has no valid sidecar; rebuilding")
        return False
    if sha256_file(image) != expected:
        if not quiet:
            log(f"cached base image {image.name} is corrupt (sha256 mismatch); rebuilding")
        return False
    return True


def check_build_host() -> None:
    """Refuse, in one line, a host that cannot run the recipe."""
    require_root_and_tools(
        "building the Debian base image",
        "mmdebstrap --mode=root, loop devices, mount",
        BUILD_TOOLS,
        "run factory as root, or use a prebuilt cloud image via base.url",
    )


def _remove_stale_workdirs(base_dir: Path, name: str, log: Log) -> None:
    # Called with the lock held, so these belong to builds that died (e.g. SIGKILL).
    for stale in base_dir.glob(f".build-{name}-*"):
        if stale.is_dir():
            remove_unless_mounted(stale, log)
