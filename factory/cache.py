"""The factory cache directory and its layout: base images, channels and probes, keyed by
their inputs, and downloads stored under their sha256.

    ~/.cache/factory/            (or --cache-dir, or $FACTORY_CACHE_DIR)
      base/                      Debian base images, their sidecars, logs and build locks
      downloads/                 cloud images, named <sha256><suffix>
      pkgs/<sha256>/             conda packages the locks name
      wheels/<sha256>/           wheels the locks name
      conda-installers/<sha256>/ Miniconda and Miniforge installers
      installer/                 the py-rattler wheel the image installs with
      rattler/                   py-rattler's repodata cache
      probes/                    KVM probe verdicts and the kernels they boot
      channels/                  local conda channels (the demo's, the tests')
      layers/                    build layers: qcow2 overlays keyed by their inputs (factory.layers)
"""

import hashlib
import json
import os
from pathlib import Path

CACHE_ENV_VAR = "FACTORY_CACHE_DIR"
_override: Path | None = None

# The named sub-folders; modules ask for them by these names instead of spelling paths.
BASE = "base"
DOWNLOADS = "downloads"
PKGS = "pkgs"
WHEELS = "wheels"
CONDA_INSTALLERS = "conda-installers"
INSTALLER = "installer"
RATTLER = "rattler"
PROBES = "probes"
CHANNELS = "channels"
LAYERS = "layers"
SUBFOLDERS = (
    BASE, DOWNLOADS, PKGS, WHEELS, CONDA_INSTALLERS, INSTALLER, RATTLER, PROBES, CHANNELS, LAYERS,
)  # fmt: skip


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


def cache_subdir(name: str) -> Path:
    """One of the cache's named sub-folders (see SUBFOLDERS), created when missing."""
    if name not in SUBFOLDERS:
        raise ValueError(f"{name!r} is not a cache sub-folder; add it to factory.cache")
    path = cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def inputs_key(inputs: object) -> str:
    """A short stable hash of JSON-serialisable inputs, used to key cache entries."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in chunks (disk images do not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
