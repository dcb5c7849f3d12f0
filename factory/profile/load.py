"""Loading a profile: the file and everything it extends (files or presets), merged, with the
files it names made absolute and confined, validated by the model, and hashed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from factory.errors import ProfileError
from factory.profile.documents import Document, location, location_in, read_document
from factory.profile.environment_file import imported_environment
from factory.profile.messages import validation_problem
from factory.profile.paths import (
    PRESETS_DIR,
    allowed_roots,
    local_channel,
    named_file,
    sample_notebook,
    signing_key,
)
from factory.profile.schema import Profile
from factory.profile.tls import check_client_tls


class LoadedProfile(BaseModel):
    """A validated profile with where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    profile: Profile
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.profile.name

    def resolve_channel(self, channel: str) -> str:
        """Return a channel as a URL; relative paths are taken from the profile's folder."""
        if re.match(r"^[a-z][a-z0-9+.-]*://", channel):
            return channel
        if "/" not in channel and not channel.startswith("."):
            return f"https://conda.anaconda.org/{channel}"
        return (self.path.parent / channel).resolve().as_uri()


def _parent_paths(document: Document) -> list[Path]:
    extends = document.data.get("extends", [])
    names = [extends] if isinstance(extends, str) else extends
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProfileError(
            f"{location(document, ('extends',))}: give a file path or a preset name, or a list "
            "of them"
        )
    parents = []
    for index, name in enumerate(names):
        loc = ("extends",) if isinstance(extends, str) else ("extends", index)
        if name.endswith((".yaml", ".yml")) or "/" in name:
            parents.append(named_file(document, loc, name))
            continue
        parent = PRESETS_DIR / f"{name}.yaml"
        if not re.match(r"^[a-z0-9-]+$", name) or not parent.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
            raise ProfileError(f"{location(document, loc)}: no preset '{name}' (presets: {known})")
        parents.append(parent)
    return parents


def _load_chain(
    path: Path, roots: tuple[Path, ...], stack: tuple[Path, ...] = ()
) -> list[Document]:
    """The profile and everything it extends, most specific first."""
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(p.name for p in (*stack, path))
        raise ProfileError(f"{stack[-1]}: extends: cycle {cycle}; remove one of these extends")
    document = read_document(path, roots)
    chain = [document]
    for parent in _parent_paths(document):
        chain += _load_chain(parent, roots, (*stack, path))
    return chain


def _merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; anything else in `override` replaces `base`."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _environment_paths(document: Document, index: int, env: object) -> object:
    """An environment with its local channels and its environment file's content resolved."""
    if not isinstance(env, dict):
        return env
    channels = env.get("channels")
    if isinstance(channels, list):
        where = [
            location(document, ("environments", index, "channels", n)) for n in range(len(channels))
        ]
        channels = [
            local_channel(w, c, document.path.parent, document.roots)
            for w, c in zip(where, channels, strict=True)
        ]
        env = {**env, "channels": channels}
    if "environment_file" in env:
        env = imported_environment(document, index, env)
    return env


def _service_paths(document: Document, index: int, service: object) -> object:
    """A service with the files it names made absolute and checked."""
    if not isinstance(service, dict) or not isinstance(service.get("files"), list):
        return service
    files = [
        str(named_file(document, ("services", index, "files", n), name))
        for n, name in enumerate(service["files"])
    ]
    return {**service, "files": files}


def _absolute_paths(document: Document) -> dict:
    """The document's data with the files and local channels it names made absolute, each
    checked to lie under the allowed roots."""
    data = dict(document.data)
    notebooks = data.get("notebooks")
    if isinstance(notebooks, list):
        data["notebooks"] = [
            sample_notebook(document, ("notebooks", i), n) for i, n in enumerate(notebooks)
        ]
    envs = data.get("environments")
    if isinstance(envs, list):
        data["environments"] = [_environment_paths(document, i, env) for i, env in enumerate(envs)]
    services = data.get("services")
    if isinstance(services, list):
        data["services"] = [_service_paths(document, i, s) for i, s in enumerate(services)]
    tls = (data.get("jupyter") or {}).get("tls") if isinstance(data.get("jupyter"), dict) else None
    if isinstance(tls, dict):
        resolved = {
            key: str(named_file(document, ("jupyter", "tls", key), tls[key]))
            for key in ("certificate", "key")
            if key in tls
        }
        data["jupyter"] = {**data["jupyter"], "tls": {**tls, **resolved}}
    signing = data.get("signing")
    if isinstance(signing, dict) and "key" in signing:
        key = signing_key(document, ("signing", "key"), signing["key"])
        data["signing"] = {**signing, "key": key}
    return data


def load_profile(path: Path | str) -> LoadedProfile:
    """Read and validate a profile (and what it extends), raising ProfileError with one line
    on any problem."""
    chain = _load_chain(Path(path), allowed_roots(Path(path)))
    data: dict = {}
    for document in reversed(chain):
        data = _merge(data, _absolute_paths(document))
    data.pop("extends", None)
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        loc, detail = validation_problem(exc.errors(), Profile)
        raise ProfileError(f"{location_in(chain, loc)}: {detail}") from None
    if profile.jupyter.tls is not None:
        check_client_tls(chain, profile.jupyter.tls)
    digest = hashlib.sha256(b"".join(d.raw for d in chain))
    for sample in [*profile.notebooks, *(f for s in profile.services for f in s.files)]:
        digest.update(Path(sample).read_bytes())
    return LoadedProfile(profile=profile, path=chain[0].path, sha256=digest.hexdigest())
