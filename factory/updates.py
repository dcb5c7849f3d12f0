"""Debian security updates: the suites an image is built from, the state of the security index
(part of the base layer's cache key), the index an image was upgraded against, and which
installed packages that index holds newer versions of."""

from __future__ import annotations

import gzip
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path

from debian import deb822
from debian.debian_support import version_compare

from factory.download import Unreachable, fetch_bytes
from factory.errors import FactoryError

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_ARCHIVE = "http://deb.debian.org/debian-security"
ARCHITECTURES = ("amd64", "all")
# In the build folder and the delivery: the security index the image was upgraded against.
INDEX_FILE = "security-index.json"
_READERS = {".xz": lzma.decompress, ".gz": gzip.decompress, "": bytes}
# A JSON file of index states, {"<InRelease URL> <components>": state}, written by
# pin_index_states(): the builds of one batch (tests/conftest.py pins a test run) key their
# bases by it, so that an update published halfway through does not split the batch across
# two base layers.
PIN_VARIABLE = "FACTORY_SECURITY_INDEX_PIN"


def security_archive(mirror: str) -> str:
    """The security archive that goes with a Debian mirror: Debian's own for deb.debian.org,
    otherwise `<mirror>-security`, the layout of a local mirror of both."""
    mirror = mirror.rstrip("/")
    return DEBIAN_SECURITY_ARCHIVE if mirror == DEBIAN_MIRROR else f"{mirror}-security"


def apt_sources(mirror: str, suite: str, components: list[str]) -> list[str]:
    """sources.list lines for the release, its updates and its security suite."""
    parts = " ".join(components)
    mirror = mirror.rstrip("/")
    return [
        f"deb {mirror} {suite} {parts}",
        f"deb {mirror} {suite}-updates {parts}",
        f"deb {security_archive(mirror)} {suite}-security {parts}",
    ]


def _packages_indexes(components: list[str]) -> set[str]:
    return {f"{c}/binary-{arch}/Packages.xz" for c in components for arch in ARCHITECTURES}


def _index_url(mirror: str, suite: str) -> str:
    return f"{security_archive(mirror)}/dists/{suite}-security/InRelease"


def _pin_key(mirror: str, suite: str, components: list[str]) -> str:
    return f"{_index_url(mirror, suite)} {','.join(components)}"


def index_state(mirror: str, suite: str, components: list[str]) -> dict:
    """The security suite's Release date and the digests of its Packages indexes, read from
    its InRelease: it changes whenever a security update is published. A pinned state
    (PIN_VARIABLE) for this archive is returned instead of reading it."""
    pin = os.environ.get(PIN_VARIABLE)
    if pin and (pinned := _pinned_states(Path(pin)).get(_pin_key(mirror, suite, components))):
        return pinned
    return _read_index_state(mirror, suite, components)


def _read_index_state(mirror: str, suite: str, components: list[str]) -> dict:
    url = _index_url(mirror, suite)
    try:
        release = deb822.Release(fetch_bytes(url, what="the security index"))
    except Unreachable as error:
        raise FactoryError(
            f"cannot read the security index {url}: {error.reason}; the image must be built "
            "against Debian's security suite: check the network, or mirror it beside base.mirror"
        ) from None
    wanted = _packages_indexes(components)
    digests = {e["name"]: e["sha256"] for e in release.get("SHA256", []) if e["name"] in wanted}
    if not digests:
        raise FactoryError(f"{url} lists no Packages index for {', '.join(components)}")
    return {"suite": f"{suite}-security", "date": release.get("Date", ""), "indexes": digests}


def _pinned_states(pin: Path) -> dict:
    try:
        return json.loads(pin.read_text())
    except (OSError, ValueError) as error:
        raise FactoryError(
            f"{PIN_VARIABLE}={pin}: cannot read it ({error}); unset it, or pin again"
        ) from None


def pin_index_states(pin: Path, mirror: str, suite: str, components: list[str]) -> dict:
    """Read the security index's state now and add it to the pin file `pin`."""
    states = _pinned_states(pin) if pin.is_file() else {}
    state = _read_index_state(mirror, suite, components)
    states[_pin_key(mirror, suite, components)] = state
    pin.write_text(json.dumps(states, indent=1))
    return state


@dataclass(frozen=True)
class SecurityIndex:
    """What a security suite held at one moment: its date and the newest version of each
    binary package."""

    suite: str
    date: str
    packages: dict[str, str]

    def to_json(self) -> dict:
        return {"suite": self.suite, "date": self.date, "packages": self.packages}

    @classmethod
    def from_json(cls, data: dict) -> SecurityIndex:
        return cls(str(data["suite"]), str(data["date"]), dict(data["packages"]))


def read_apt_lists(lists: Path, suite: str) -> SecurityIndex | None:
    """The security index apt downloaded into `lists` (an image's /var/lib/apt/lists), or
    None when its sources name no `<suite>-security`."""
    security = f"{suite}-security"
    releases = sorted(lists.glob(f"*_dists_{security}_InRelease"))
    if not releases:
        return None
    date = deb822.Release(releases[0].read_bytes()).get("Date", "")
    packages: dict[str, str] = {}
    for path in sorted(lists.glob(f"*_dists_{security}_*_Packages*")):
        if not any(f"_binary-{arch}_" in path.name for arch in ARCHITECTURES):
            continue
        text = _READERS[path.suffix if path.suffix in _READERS else ""](path.read_bytes())
        for stanza in deb822.Packages.iter_paragraphs(
            text.decode("utf-8", "replace"), use_apt_pkg=False
        ):
            name, version = stanza.get("Package"), stanza.get("Version")
            if (
                name
                and version
                and (name not in packages or version_compare(version, packages[name]) > 0)
            ):
                packages[name] = version
    return SecurityIndex(security, date, packages)


def pending_updates(installed: dict[str, str], index: SecurityIndex) -> list[str]:
    """'name installed < available' for each installed package the index holds newer."""
    return [
        f"{name} {version} < {index.packages[name]}"
        for name, version in sorted(installed.items())
        if name in index.packages and version_compare(version, index.packages[name]) < 0
    ]


def parse_dpkg_query(text: str) -> dict[str, str]:
    """{package: version} of installed packages, from
    `dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\\n'`."""
    installed = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "ii":
            installed[fields[1]] = fields[2]
    return installed
