"""Fetch everything the locks name onto the host, so the image installs with no network.

The payload holds the locked conda packages as an indexed private channel, the pip wheelhouse,
the locks and the conda-compatible installer (py-rattler) for the image's own python. It is
shipped into the build VM; offline profiles keep the channel and wheelhouse in the image.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import rattler.index

from factory import cache
from factory.cache import cache_subdir, sha256_file
from factory.download import ChecksumMismatch, Unreachable, fetch_locked, fetch_verified
from factory.errors import FactoryError
from factory.files import replace_path
from factory.image_layout import PAYLOAD_CHANNEL
from factory.resolve import EnvLock, pip_target_args

INSTALLER_PYTHON = "3.11"  # Debian 12's python3, which runs the installer inside the image
# The py-rattler wheel for the image, per host py-rattler version: it runs as root in the build,
# so it is pinned like everything it installs. For a new version, take the sha256 of the wheel
# `pip download py-rattler==X --no-deps` fetches with pip_target_args(INSTALLER_PYTHON).
INSTALLER_WHEELS = {
    "0.28.0": (
        "py_rattler-0.28.0-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "4f4ab1d34d5394e7ce130a86e59009c95ace4f5757d9c3af04de1351bcea47eb",
    ),
}


def fetch_conda_package(url: str, sha256: str) -> Path:
    """Return a cached copy of a locked conda package, verified against its sha256."""
    return fetch_locked(url, sha256, cache.PKGS)


def _pip_download(requirements: Path, python: str, dest: Path, log) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--require-hashes", "-r", str(requirements), "-d", str(dest)]
    command += pip_target_args(python)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
        raise FactoryError(f"pip download failed for {requirements.name}: {' '.join(last)}")


def _installer_wheels(dest: Path, version: str | None = None) -> None:
    """py-rattler (the same version as the host's) for the image's python, downloaded with
    its pinned sha256 and checked again whenever the cached copy is reused."""
    version = version or metadata.version("py-rattler")
    if version not in INSTALLER_WHEELS:
        raise FactoryError(
            f"no pinned sha256 for the py-rattler {version} installer wheel; add it to "
            "INSTALLER_WHEELS in factory/bundle.py, or install a pinned py-rattler "
            f"({', '.join(INSTALLER_WHEELS)})"
        )
    name, sha256 = INSTALLER_WHEELS[version]
    wheels = cache_subdir(cache.INSTALLER) / f"py-rattler-{version}"
    wheel = wheels / name
    if not (wheel.is_file() and sha256_file(wheel) == sha256):
        wheel.unlink(missing_ok=True)
        wheels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheels) as scratch:
            requirements = Path(scratch) / "py-rattler-installer.txt"
            requirements.write_text(f"py-rattler=={version} --hash=sha256:{sha256}\n")
            _pip_download(requirements, INSTALLER_PYTHON, Path(scratch), log=print)
            fetched = Path(scratch) / name
            if not fetched.is_file():
                got = [p.name for p in Path(scratch).glob("*.whl")]
                raise FactoryError(f"pip fetched {got} for the installer, not the pinned {name}")
            if sha256_file(fetched) != sha256:
                raise FactoryError(f"{name}: sha256 differs from the pin in factory/bundle.py")
            replace_path(fetched, wheel)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, dest / name)


def fetch_conda_installer(url: str, sha256: str, log=print) -> Path:
    """A cached copy of the Miniconda/Miniforge installer, verified against its sha256."""
    name = url.rsplit("/", 1)[-1]
    dest = cache_subdir(cache.CONDA_INSTALLERS) / sha256 / name
    try:
        return fetch_verified(url, sha256, dest, what="the conda installer", log=log)
    except ChecksumMismatch as error:
        raise FactoryError(
            f"conda.sha256: {name} has sha256 {error.actual}, the profile pins "
            f"{sha256}; check the download or fix the pin"
        ) from None
    except Unreachable as error:
        raise FactoryError(
            f"conda.url: {error}; put the installer where the build host can "
            "read it (file://...) or use conda.installer: rattler"
        ) from None


def local_explicit_text(lock: EnvLock, channel_dir: str) -> str:
    """The explicit lock with each package read from the shipped channel, for `conda create
    --offline --file`."""
    lines = [f"# {lock.name}: the lock's packages from {channel_dir}", "@EXPLICIT"]
    for package in lock.conda:
        subdir = package.url.rsplit("/", 2)[-2]
        lines.append(f"file://{channel_dir}/{subdir}/{package.file_name}#{package.md5}")
    return "\n".join(lines) + "\n"


def build_payload(
    locks: dict[str, EnvLock],
    payload: Path,
    log=print,
    conda_installer: Path | None = None,
) -> Path:
    """Write the payload directory: conda packages, wheels, locks and the installer(s)."""
    channel, wheels, envs = payload / "channel", payload / "wheels", payload / "envs"
    for folder in (channel / "noarch", channel / "linux-64", wheels, envs):
        folder.mkdir(parents=True, exist_ok=True)
    for lock in locks.values():
        log(f"fetching {len(lock.conda)} conda packages for '{lock.name}'")
        for package in lock.conda:
            source = fetch_conda_package(package.url, package.sha256)
            target = channel / package.url.rsplit("/", 2)[-2] / package.file_name
            if not target.exists():
                shutil.copy2(source, target)
                target.chmod(0o644)
        env_dir = envs / lock.name
        env_dir.mkdir(exist_ok=True)
        (env_dir / "explicit.txt").write_text(lock.explicit_text())
        (env_dir / "explicit.local.txt").write_text(local_explicit_text(lock, str(PAYLOAD_CHANNEL)))
        (env_dir / "pip.txt").write_text(lock.pip_text())
        (env_dir / "lock.json").write_text(json.dumps(lock.to_json(), indent=2) + "\n")
        if lock.pip:
            log(f"fetching {len(lock.pip)} wheels for '{lock.name}'")
            with tempfile.TemporaryDirectory(dir=payload) as scratch:
                _pip_download(env_dir / "pip.txt", lock.python, Path(scratch), log)
                for wheel in Path(scratch).iterdir():
                    shutil.move(str(wheel), wheels / wheel.name)
    log("indexing the private channel")
    asyncio.run(rattler.index.index_fs(channel, force=True, write_zst=False, write_shards=False))
    log("fetching the rattler installer")
    _installer_wheels(payload / "installer")
    if conda_installer is not None:
        (payload / "conda-installer").mkdir(exist_ok=True)
        shutil.copy2(conda_installer, payload / "conda-installer" / "installer.sh")
    _write_checksums(payload)
    return payload


def _write_checksums(payload: Path) -> None:
    lines = []
    for path in sorted(p for p in payload.rglob("*") if p.is_file()):
        lines.append(f"{sha256_file(path)}  {path.relative_to(payload)}")
    (payload / "SHA256SUMS").write_text("\n".join(lines) + "\n")
