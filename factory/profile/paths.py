"""Files a profile names (extends, notebooks, environment files, TLS files, local channels):
made absolute from the file that names them and confined, after symlinks, to the allowed roots.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from factory.cache import cache_dir
from factory.errors import ProfileError
from factory.profile.documents import Document, location, read_file
from factory.profile.sections import plain_channel

# Presets and their notebooks ship inside the package, so a wheel finds them as a checkout does.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
# The repository root when running from a checkout; None in an installed package.
_ABOVE_PACKAGE = Path(__file__).resolve().parents[2]
CHECKOUT_DIR = _ABOVE_PACKAGE if (_ABOVE_PACKAGE / "pyproject.toml").is_file() else None
# The example profiles of a checkout, which users start from; an installed package has none.
EXAMPLES_DIR = CHECKOUT_DIR / "profiles" if CHECKOUT_DIR else PRESETS_DIR
ALLOWED_ROOTS_ENV_VAR = "FACTORY_ALLOWED_ROOTS"
MAX_NOTEBOOK_BYTES = 64 << 20
SPECIAL_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))


def allowed_roots(profile_path: Path) -> tuple[Path, ...]:
    """The folders every file a profile names must lie in, after symlinks: the profile's own
    folder, the presets, the example profiles, and the folders listed in
    $FACTORY_ALLOWED_ROOTS (separated by os.pathsep)."""
    listed = os.environ.get(ALLOWED_ROOTS_ENV_VAR, "").split(os.pathsep)
    extra = [Path(p).expanduser().resolve() for p in listed if p.strip()]
    return (profile_path.resolve().parent, PRESETS_DIR, EXAMPLES_DIR, *extra)


def confined(where: str, value: str, path: Path, roots: tuple[Path, ...]) -> Path:
    """`path` after symlinks; refused under /proc, /sys or /dev, and outside `roots`."""
    resolved = path.resolve()
    shown = value if value == str(resolved) else f"{value} (that is {resolved})"
    special = next((tree for tree in SPECIAL_TREES if resolved.is_relative_to(tree)), None)
    if special is not None:
        raise ProfileError(
            f"{where}: {shown} is a special file (under {special}), not a regular file; "
            "name a regular file"
        )
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ProfileError(
            f"{where}: {shown} is outside this profile's folder {roots[0]}; move it there, or "
            f"allow its folder (factory --allow-root DIR, or {ALLOWED_ROOTS_ENV_VAR})"
        )
    return resolved


def named_file(document: Document, loc: tuple, value: object, suffix: str | tuple = "") -> Path:
    """A file named in the profile, made absolute from the folder of the file naming it; it
    must be a regular file under the allowed roots."""
    where = location(document, loc)
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(f"{where}: give a file path")
    path = confined(where, value, document.path.parent / value, document.roots)
    if not path.exists():
        raise ProfileError(f"{where}: no file {path}; fix the path (relative to this file)")
    if not path.is_file():
        raise ProfileError(f"{where}: {path} is not a regular file; name a regular file")
    if not path.name.endswith(suffix):
        kinds = " or ".join([suffix] if isinstance(suffix, str) else suffix)
        raise ProfileError(f"{where}: {path.name} is not a {kinds} file")
    return path


def signing_key(document: Document, loc: tuple, value: object) -> object:
    """A signing key named in the profile, made absolute from the folder of the file naming it
    (`~` is the home folder). Unlike the other files it is not confined to the profile's
    folder, which is committed, and it need not exist yet: pre-flight checks it where a
    delivery is signed, so that a delivery's profile still loads where the key is not."""
    if not isinstance(value, str) or not value.strip():
        return value  # the schema says what is wrong
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # no such user, or no home folder
        raise ProfileError(
            f"{location(document, loc)}: cannot find the home folder in {value}; give a full path"
        ) from None
    return str((document.path.parent / path).resolve())


def local_channel(where: str, channel: object, folder: Path, roots: tuple[Path, ...]) -> object:
    """A channel, with a local channel folder made a file:// URL (after symlinks) from
    `folder`. An existing folder must lie under the allowed roots or the factory cache's
    channels; a missing one (a delivered profile read on another host) is left to the solver."""
    if not isinstance(channel, str) or not plain_channel(channel):
        return channel  # the schema says what is wrong
    if re.match(r"^[a-z][a-z0-9+.-]*://", channel):
        url = urlparse(channel)
        if url.scheme != "file":
            return channel
        if url.netloc not in ("", "localhost"):
            raise ProfileError(f"{where}: {channel} names a host; write file:///absolute/path")
        path = Path(unquote(url.path))
    elif "/" not in channel and not channel.startswith("."):
        return channel
    else:
        path = folder / channel
    resolved = path.resolve()
    if not resolved.exists():
        return resolved.as_uri()  # nothing to read here; the solver says it is missing
    confined(where, channel, resolved, (*roots, cache_dir() / "channels"))
    if not resolved.is_dir():
        raise ProfileError(
            f"{where}: {channel} is not a folder; a local channel is a folder holding "
            "noarch/ and linux-64/ with their repodata.json"
        )
    return resolved.as_uri()


PRESET_NOTEBOOK = "preset:"


def sample_notebook(document: Document, loc: tuple, value: object) -> str:
    """A sample notebook named in the profile: a JSON object, as Jupyter saves it. `preset:NAME`
    names a notebook the presets ship (an installed package has them too)."""
    if isinstance(value, str) and value.startswith(PRESET_NOTEBOOK):
        shipped = sorted(p.name for p in (PRESETS_DIR / "notebooks").glob("*.ipynb"))
        name = value.removeprefix(PRESET_NOTEBOOK)
        if name not in shipped:
            raise ProfileError(
                f"{location(document, loc)}: no preset notebook '{name}'; use one of "
                f"{', '.join(PRESET_NOTEBOOK + n for n in shipped)}"
            )
        value = str(PRESETS_DIR / "notebooks" / name)
    path = named_file(document, loc, value, ".ipynb")
    where = location(document, loc)
    try:
        notebook = json.loads(read_file(path, where, MAX_NOTEBOOK_BYTES, "notebook"))
    except ValueError as error:
        raise ProfileError(
            f"{where}: {path.name} is not a notebook (not JSON: {error}); save it again from "
            "Jupyter"
        ) from None
    if not isinstance(notebook, dict) or not isinstance(notebook.get("metadata", {}), dict):
        raise ProfileError(
            f"{where}: {path.name} is not a notebook (JSON, but not an object with cells and "
            "metadata); save it again from Jupyter"
        )
    return str(path)


def notebook_kernel(notebook: Path | dict, environments: list[str]) -> str:
    """The environment a sample notebook runs on: the one its metadata.kernelspec.name names,
    when that is one of the profile's environments, else the first."""
    if isinstance(notebook, Path):
        try:
            notebook = json.loads(notebook.read_text())
        except (OSError, ValueError):
            notebook = {}
    metadata = notebook.get("metadata") if isinstance(notebook, dict) else None
    kernelspec = metadata.get("kernelspec") if isinstance(metadata, dict) else None
    named = kernelspec.get("name") if isinstance(kernelspec, dict) else None
    return named if named in environments else environments[0]
