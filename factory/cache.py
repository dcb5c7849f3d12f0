"""The factory cache directory: base images, channels and probes, keyed by their inputs."""

import hashlib
import json
import os
from pathlib import Path

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
