"""`factory release`: the next version of a profile. Its one `version: N` line becomes N+1 (every
other byte is kept), its locks are written for it as `factory lock` writes them, and both are
staged in git. A version already delivered is never made again: its build would overwrite it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory.delivery import Delivery
from factory.errors import FactoryError
from factory.files import write_text_atomically
from factory.profile import LoadedProfile, Profile, load_profile
from factory.resolve import EnvLock, lock_dir_for, lock_profile


@dataclass(frozen=True)
class Release:
    profile: Path
    old_name: str
    new_name: str
    locks: dict[str, EnvLock]
    staged: list[Path]
    ignored: list[Path]  # not staged: git ignores them


def bump_version_text(text: str, version: int) -> str:
    """`text` with its top-level `version: <version>` line set to version + 1; its comment,
    spacing and line ending stay as they were."""
    line = re.compile(rf"^(version:[ \t]*){version}(?=[ \t]*(?:#[^\r\n]*)?\r?$)", re.M)
    bumped, count = line.subn(rf"\g<1>{version + 1}", text)
    if count != 1:
        raise FactoryError(
            f"no line `version: {version}` of its own at the top level; write `version: "
            f"{version}` as one line in this file (not only in what it extends)"
        )
    return bumped


def delivered_versions(outputs: Path, profile: Profile) -> dict[int, Path]:
    """{version: folder} of this client's project delivered in `outputs`."""
    prefix = f"{profile.client}_{profile.project}_v".replace("-", "_")
    found = {}
    for folder in outputs.glob(f"{prefix}*"):
        number = folder.name.removeprefix(prefix)
        if number.isdigit() and Delivery(folder, folder.name).profile.is_file():
            found[int(number)] = folder
    return found


def refuse_delivered(outputs: Path, loaded: LoadedProfile) -> None:
    """Refuse a next version that is delivered already, or older than one that is."""
    version = loaded.profile.version
    delivered = delivered_versions(outputs, loaded.profile)
    latest = max(delivered, default=0)
    if latest > version:
        raise FactoryError(
            f"{delivered[latest]}: version {latest} is delivered already, so a build of version "
            f"{version + 1} would {'overwrite it' if latest == version + 1 else 'go back'}; set "
            f"`version: {latest}` in {loaded.path.name} and run `factory release` again"
        )


def _same_but_version(old: Profile, new: Profile) -> bool:
    def essentials(profile: Profile) -> dict:
        data = profile.model_dump(mode="json", exclude={"version"})
        for env in data["environments"]:
            env.pop("name")  # the first one's default name carries the version
        return data

    return new.version == old.version + 1 and essentials(old) == essentials(new)


def release_profile(path: Path, outputs: Path, log: Callable[[str], None] = print) -> Release:
    """Bump the profile's version, lock it and stage both in git; on any failure the profile
    is left as it was."""
    loaded = load_profile(path)
    refuse_delivered(outputs, loaded)
    profile = loaded.path
    original = profile.read_bytes().decode("utf-8")
    try:
        bumped = bump_version_text(original, loaded.profile.version)
    except FactoryError as error:
        raise FactoryError(f"{profile}: {error}") from None
    write_text_atomically(profile, bumped, mode=profile.stat().st_mode & 0o7777)
    try:
        released = load_profile(profile)
        if not _same_but_version(loaded.profile, released.profile):
            raise FactoryError(
                f"{profile}: changing the version line changed more than the version; set "
                f"`version: {loaded.profile.version + 1}` by hand"
            )
        locks = lock_profile(released, log=log)
    except BaseException:
        write_text_atomically(profile, original, mode=profile.stat().st_mode & 0o7777)
        raise
    staged, ignored = stage_in_git([profile, lock_dir_for(released)])
    return Release(profile, loaded.name, released.name, locks, staged, ignored)


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)


def stage_in_git(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """`git add` the paths when they lie in a git work tree: (staged, ignored by git)."""
    folder = paths[0].parent
    if (
        shutil.which("git") is None
        or _git(folder, "rev-parse", "--is-inside-work-tree").stdout.strip() != "true"
    ):
        return [], []
    ignored = [p for p in paths if _git(folder, "check-ignore", "-q", str(p)).returncode == 0]
    staged = [p for p in paths if p not in ignored]
    if staged:
        added = _git(folder, "add", "--", *map(str, staged))
        if added.returncode != 0:
            problem = (added.stderr.strip().splitlines() or ["no message"])[-1]
            raise FactoryError(
                f"git add {' '.join(map(str, staged))} failed ({problem}); stage them by hand"
            )
    return staged, ignored
