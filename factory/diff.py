"""What changed between two profiles or two deliveries, for a client's change review: the
packages of each environment (read from the locks), the image's Debian packages (read from the
SBOMs, when both sides have one) and the settings of the effective profiles.

Package specs are not compared as settings: what they resolve to is, through the locks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import rattler
from debian.debian_support import Version as DebianVersion
from packaging.version import InvalidVersion
from packaging.version import Version as PipVersion

from factory.delivery import Delivery
from factory.errors import FactoryError
from factory.profile import LoadedProfile, load_profile
from factory.resolve import EnvLock, image_environments, lock_environment
from factory.sbom import DEB, read_sbom

UNSET = "(unset)"


@dataclass(frozen=True)
class Source:
    """One side of a diff, read: the effective profile, its locks and its Debian packages
    ({name: version}; None without an SBOM, as for a profile)."""

    label: str
    loaded: LoadedProfile
    locks: dict[str, EnvLock]
    debian: dict[str, str] | None = None


@dataclass(frozen=True)
class Locked:
    """A package as a lock or SBOM names it: its version and the digest of its file."""

    version: str
    digest: str = ""


@dataclass(frozen=True)
class PackageChange:
    name: str
    old: str | None  # None: added
    new: str | None  # None: removed
    note: str = ""  # upgrade, downgrade, or another build of the same version


@dataclass(frozen=True)
class PackageSection:
    title: str
    changes: list[PackageChange]


@dataclass(frozen=True)
class SettingChange:
    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Changes:
    old: str
    new: str
    packages: list[PackageSection] = field(default_factory=list)
    settings: list[SettingChange] = field(default_factory=list)
    debian: list[PackageChange] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.packages or self.settings or self.debian)


# --- reading a side -------------------------------------------------------------------------


def read_source(path: Path) -> Source:
    """A profile (YAML, with its committed locks) or a delivery folder (outputs/<name>/)."""
    if path.is_dir():
        return _read_delivery(path)
    around = Delivery(path.parent, path.parent.name)
    if path == around.profile and around.locks.is_dir():
        return _read_delivery(path.parent)  # a delivery's own profile.yaml, named directly
    if not path.exists():
        raise FactoryError(f"{path}: no such file or folder; give a profile or outputs/<name>/")
    loaded = load_profile(path)
    # Solves nothing: a missing or stale lock is refused with `factory lock PROFILE` as the fix.
    locks = {
        env.name: lock_environment(loaded, env, locked=True) for env in image_environments(loaded)
    }
    return Source(str(path), loaded, locks)


def _read_delivery(path: Path) -> Source:
    delivery = Delivery(path, path.name)
    if not delivery.profile.is_file():
        raise FactoryError(
            f"{path}: not a delivery folder (no profile.yaml); give a profile or outputs/<name>/"
        )
    loaded = load_profile(delivery.profile)
    delivery = Delivery(path, loaded.name)
    locks = {}
    for env in image_environments(loaded):
        lock_file = delivery.locks / f"{env.name}.lock.json"
        try:
            locks[env.name] = EnvLock.from_json(json.loads(lock_file.read_text()))
        except OSError:
            raise FactoryError(
                f"{lock_file}: missing; the delivery is incomplete, build it again"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise FactoryError(
                f"{lock_file}: not a lock written by factory; build the delivery again"
            ) from None
    return Source(str(path), loaded, locks, _debian_packages(delivery.sbom))


def _debian_packages(sbom: Path) -> dict[str, str] | None:
    if not sbom.is_file():
        return None
    try:
        packages = read_sbom(sbom)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise FactoryError(f"{sbom}: not a CycloneDX JSON SBOM; build the delivery again") from None
    return {p.name: p.version for p in packages if p.kind == DEB}


# --- packages -------------------------------------------------------------------------------


def _conda_newer(old: str, new: str) -> bool:
    return rattler.Version(new) > rattler.Version(old)


def _pip_newer(old: str, new: str) -> bool:
    return PipVersion(new) > PipVersion(old)


def _debian_newer(old: str, new: str) -> bool:
    return DebianVersion(new) > DebianVersion(old)


def compare_packages(
    old: dict[str, Locked], new: dict[str, Locked], newer: Callable[[str, str], bool]
) -> list[PackageChange]:
    """Added, removed and changed packages, by name; `newer(old, new)` orders two versions
    as the package's own ecosystem does."""
    changes = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if before is None or after is None:
            changes.append(PackageChange(name, before and before.version, after and after.version))
        elif before.version == after.version:
            changes.append(PackageChange(name, before.version, after.version, "another build"))
        else:
            changes.append(
                PackageChange(name, before.version, after.version, _direction(before, after, newer))
            )
    return changes


def _direction(before: Locked, after: Locked, newer: Callable[[str, str], bool]) -> str:
    try:
        return "upgrade" if newer(before.version, after.version) else "downgrade"
    except (InvalidVersion, ValueError, TypeError):  # a version its ecosystem cannot order
        return ""


def _conda_packages(lock: EnvLock | None) -> dict[str, Locked]:
    return {p.name: Locked(p.version, p.sha256 or p.md5) for p in lock.conda} if lock else {}


def _pip_packages(lock: EnvLock | None) -> dict[str, Locked]:
    return {p.name: Locked(p.version, p.sha256) for p in lock.pip} if lock else {}


def pair_environments(old: Iterable[str], new: Iterable[str]) -> dict[str, str]:
    """{old name: new name} for the environments compared with each other: the same name, or,
    when exactly one environment on each side is left over, those two (a rename)."""
    old, new = list(old), list(new)
    pairs = {name: name for name in old if name in new}
    left_old = [n for n in old if n not in pairs]
    left_new = [n for n in new if n not in pairs.values()]
    if len(left_old) == 1 and len(left_new) == 1:
        pairs[left_old[0]] = left_new[0]
    return pairs


def environment_sections(old: Source, new: Source) -> list[PackageSection]:
    """Conda and pip changes of each environment: the newer side's, then those removed."""
    was = {after: before for before, after in pair_environments(old.locks, new.locks).items()}
    rows = [(was.get(name), name, name) for name in new.locks]
    rows += [(name, None, name) for name in old.locks if name not in was.values()]
    sections = []
    for before, after, label in rows:
        if before and after and before != after:
            label = f"{after} (was {before})"
        for kind, packages, newer in (
            ("conda", _conda_packages, _conda_newer),
            ("pip", _pip_packages, _pip_newer),
        ):
            changes = compare_packages(
                packages(old.locks.get(before or "")), packages(new.locks.get(after or "")), newer
            )
            if changes:
                sections.append(PackageSection(f"environment {label}, {kind} packages", changes))
    return sections


# --- settings -------------------------------------------------------------------------------


def _short_digest(path: str) -> str:
    try:
        return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        return "(missing)"


def effective_settings(loaded: LoadedProfile, renamed: dict[str, str] | None = None) -> dict:
    """The profile's settings as a nested mapping fit to compare across folders and hosts:
    channels as URLs, files by content, environments by name (`renamed` maps an old name to
    the name it is compared under), plus the ports the firewall opens."""
    profile = loaded.profile
    data = profile.model_dump(mode="json", exclude={"extends"})
    environments = {}
    for env in data["environments"]:
        for spec_field in ("conda", "pip", "environment_file"):
            env.pop(spec_field)  # compared through the locks
        env["channels"] = [loaded.resolve_channel(c) for c in env["channels"]]
        environments[(renamed or {}).get(env["name"], env["name"])] = env
    jupyter = data["jupyter"]
    jupyter.pop("packages")  # compared through the jupyter environment's lock
    if jupyter["tls"]:
        jupyter["tls"] = {"certificate": _short_digest(jupyter["tls"]["certificate"])}
    data["notebooks"] = {Path(n).name: _short_digest(n) for n in profile.notebooks}
    return {**data, "environments": environments, "open_ports": profile.open_ports()}


def _merged_order(first: list[str], second: list[str]) -> list[str]:
    """`first`, with each path only `second` has placed after its predecessor in `second`."""
    merged = list(first)
    for index, path in enumerate(second):
        if path not in merged:
            merged.insert(merged.index(second[index - 1]) + 1 if index else 0, path)
    return merged


def flatten(data: object, prefix: str = "") -> dict[str, object]:
    """{dotted.path: leaf}; lists are leaves, None is left out (unset)."""
    if isinstance(data, dict):
        flat: dict[str, object] = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {} if data is None else {prefix: data}


def shown(value: object) -> str:
    if value is None:
        return UNSET
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def compare_settings(old: dict, new: dict) -> list[SettingChange]:
    """Every dotted path whose value differs, in the order the profile model lists them."""
    before, after = flatten(old), flatten(new)
    return [
        SettingChange(path, shown(before.get(path)), shown(after.get(path)))
        for path in _merged_order(list(before), list(after))
        if before.get(path) != after.get(path)
    ]


# --- the whole diff -------------------------------------------------------------------------


def compare(old: Source, new: Source) -> Changes:
    renamed = {a: b for a, b in pair_environments(old.locks, new.locks).items() if a != b}
    debian: list[PackageChange] = []
    if old.debian is not None and new.debian is not None:
        debian = compare_packages(
            {n: Locked(v) for n, v in old.debian.items()},
            {n: Locked(v) for n, v in new.debian.items()},
            _debian_newer,
        )
    return Changes(
        old=old.label,
        new=new.label,
        packages=environment_sections(old, new),
        settings=compare_settings(
            effective_settings(old.loaded, renamed), effective_settings(new.loaded)
        ),
        debian=debian,
    )


def diff_paths(old: Path, new: Path) -> Changes:
    return compare(read_source(old), read_source(new))


# --- output ---------------------------------------------------------------------------------


def _package_line(change: PackageChange) -> str:
    if change.old is None:
        return f"+ {change.name} {change.new}"
    if change.new is None:
        return f"- {change.name} {change.old}"
    note = f" ({change.note})" if change.note else ""
    return f"~ {change.name} {change.old} -> {change.new}{note}"


def _sections(changes: Changes) -> list[tuple[str, list[str]]]:
    """(title, lines) of each part that differs, in the order a reviewer reads them."""
    parts = [(s.title, [_package_line(c) for c in s.changes]) for s in changes.packages]
    if changes.settings:
        parts.append(("settings", [f"{s.path}: {s.old} -> {s.new}" for s in changes.settings]))
    if changes.debian:
        parts.append(("debian packages (system-wide)", [_package_line(c) for c in changes.debian]))
    return parts


def render_text(changes: Changes) -> str:
    if changes.empty:
        return f"no differences between {changes.old} and {changes.new}\n"
    lines = []
    for title, entries in _sections(changes):
        lines += [f"{title}:", *(f"  {entry}" for entry in entries)]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _package_rows(package_changes: list[PackageChange]) -> list[str]:
    rows = ["| Package | Before | After | Change |", "|---|---|---|---|"]
    for c in package_changes:
        kind = "added" if c.old is None else "removed" if c.new is None else c.note or "changed"
        cells = (c.name, c.old or "", c.new or "", kind)
        rows.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    return rows


def render_markdown(changes: Changes) -> str:
    lines = [f"## Changes from `{changes.old}` to `{changes.new}`", ""]
    if changes.empty:
        return "\n".join([*lines, "No differences."]) + "\n"
    for section in changes.packages:
        lines += [f"### {section.title.capitalize()}", "", *_package_rows(section.changes), ""]
    if changes.settings:
        lines += ["### Settings", "", "| Setting | Before | After |", "|---|---|---|"]
        lines += [
            f"| `{_cell(s.path)}` | {_cell(s.old)} | {_cell(s.new)} |" for s in changes.settings
        ]
        lines.append("")
    if changes.debian:
        lines += ["### Debian packages (system-wide)", "", *_package_rows(changes.debian), ""]
    return "\n".join(lines)
