"""Importing a conda environment.yml into a profile's environment, read as conda reads it; a
wrong shape is one line naming the file and its line.
"""

from __future__ import annotations

import re

from factory.errors import ProfileError
from factory.profile.documents import (
    MAX_TEXT_BYTES,
    Document,
    location,
    parse_yaml,
    read_file,
)
from factory.profile.messages import field_path, line_of
from factory.profile.paths import local_channel, named_file

CONDA_PYTHON = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*::)?python\s*=+\s*(3\.\d+)")


def imported_environment(document: Document, index: int, env: dict) -> dict:
    """An environment with its environment.yml merged in (the profile's own keys win). The
    file is read as conda reads it, and a wrong shape is one line naming its file and line."""
    loc = ("environments", index, "environment_file")
    path = named_file(document, loc, env["environment_file"], (".yml", ".yaml"))
    where = location(document, loc)
    root, spec = parse_yaml(
        path, read_file(path, where, MAX_TEXT_BYTES, "environment file"), "environment file"
    )
    if not isinstance(spec, dict) or spec.get("dependencies") is None:
        raise ProfileError(f"{where}: {path} has no 'dependencies' list (conda env export)")
    deps = spec["dependencies"]

    def at(*field: str | int) -> str:
        return f"{path}:{line_of(root, field)}: {field_path(field)}"

    if not isinstance(deps, list):
        raise ProfileError(
            f"{at('dependencies')}: must be a list, one '- spec' per line (conda env export)"
        )
    if not isinstance(spec.get("name", ""), str):
        raise ProfileError(f"{at('name')}: must be a string such as 'scoring' (quote it)")
    channels = spec.get("channels") or []
    if isinstance(channels, str):
        raise ProfileError(
            f"{at('channels')}: is the single string '{channels}', not a list; write "
            f"channels: [{channels}] (conda reads a list of channel names or URLs)"
        )
    if not isinstance(channels, list):
        raise ProfileError(f"{at('channels')}: must be a list of channel names or URLs")
    for number, channel in enumerate(channels):
        if not isinstance(channel, str):
            raise ProfileError(
                f"{at('channels', number)}: must be a channel name or URL, not "
                f"{type(channel).__name__} {channel!r} (quote it)"
            )
    conda: list[str] = []
    pip: list[str] = []
    for number, dep in enumerate(deps):
        if isinstance(dep, str):
            conda.append(dep)
        elif isinstance(dep, dict) and list(dep) == ["pip"]:
            entries = dep["pip"]
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise ProfileError(
                    f"{at('dependencies', number, 'pip')}: must be a list of pip requirement "
                    "strings, one '- requirement' per line"
                )
            pip += entries
        else:
            raise ProfileError(
                f"{at('dependencies', number)}: must be a conda spec such as 'numpy>=1.26' or "
                f"a 'pip:' list, not {dep!r}; fix or re-export the file"
            )
    python = next((m.group(1) for d in conda if (m := CONDA_PYTHON.match(d))), None)
    channels = [
        local_channel(at("channels", number), channel, path.parent, document.roots)
        for number, channel in enumerate(channels)
    ]
    imported = {
        "name": spec.get("name"),
        "channels": channels,
        "conda": conda,
        "pip": pip,
        "python": python,
    }
    merged = {k: v for k, v in imported.items() if v} | env
    return {**merged, "environment_file": str(path)}
