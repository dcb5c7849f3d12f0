"""The security suite an image is built and checked against, read from Debian's real archive."""

import json
import urllib.request

import pytest

from factory import download, updates
from factory.errors import FactoryError

SUITE = "bookworm"
COMPONENTS = ["main", "contrib", "non-free", "non-free-firmware"]
LISTS_PREFIX = "deb.debian.org_debian-security_dists_bookworm-security"


@pytest.fixture(scope="module")
def real_lists(tmp_path_factory):
    """An apt lists folder as `apt-get update` leaves it, for the security suite's main
    component: Debian's real InRelease and Packages index."""
    lists = tmp_path_factory.mktemp("lists")
    base = f"{updates.DEBIAN_SECURITY_ARCHIVE}/dists/{SUITE}-security"
    for remote, local in (
        ("InRelease", "InRelease"),
        ("main/binary-amd64/Packages.xz", "main_binary-amd64_Packages.xz"),
    ):
        with urllib.request.urlopen(f"{base}/{remote}", timeout=60) as response:
            (lists / f"{LISTS_PREFIX}_{local}").write_bytes(response.read())
    return lists


def test_sources_name_the_updates_and_security_suites():
    sources = updates.apt_sources("http://deb.debian.org/debian/", SUITE, ["main", "contrib"])
    assert sources == [
        "deb http://deb.debian.org/debian bookworm main contrib",
        "deb http://deb.debian.org/debian bookworm-updates main contrib",
        "deb http://deb.debian.org/debian-security bookworm-security main contrib",
    ]
    # A local mirror keeps its security archive beside it.
    assert updates.security_archive("http://mirror.bank.local/debian") == (
        "http://mirror.bank.local/debian-security"
    )


def test_index_state_changes_with_the_security_index():
    state = updates.index_state(updates.DEBIAN_MIRROR, SUITE, COMPONENTS)
    assert state["suite"] == "bookworm-security"
    assert state["date"].endswith("UTC")
    assert len(state["indexes"]["main/binary-amd64/Packages.xz"]) == 64


def test_a_pinned_index_state_is_used_for_its_archive_only(monkeypatch, tmp_path):
    """A pinned state (read for real, then marked) is what index_state returns for that
    archive; another archive is still read, and an unreadable pin is one line."""
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.0)
    pin = tmp_path / "pin.json"
    read = updates.pin_index_states(pin, updates.DEBIAN_MIRROR, SUITE, COMPONENTS)
    states = json.loads(pin.read_text())
    ((key, state),) = states.items()
    assert state == read and key.endswith(f"/bookworm-security/InRelease {','.join(COMPONENTS)}")
    state["date"] = "pinned"
    pin.write_text(json.dumps(states))
    monkeypatch.setenv(updates.PIN_VARIABLE, str(pin))
    assert updates.index_state(updates.DEBIAN_MIRROR, SUITE, COMPONENTS)["date"] == "pinned"
    with pytest.raises(FactoryError):
        updates.index_state("http://127.0.0.1:9/debian", SUITE, COMPONENTS)
    pin.write_text("{")
    with pytest.raises(FactoryError) as error:
        updates.index_state(updates.DEBIAN_MIRROR, SUITE, COMPONENTS)
    assert updates.PIN_VARIABLE in str(error.value) and "\n" not in str(error.value)


def test_unreachable_security_index_is_one_line(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.0)
    with pytest.raises(FactoryError) as error:
        updates.index_state("http://127.0.0.1:9/debian", SUITE, COMPONENTS)
    assert "http://127.0.0.1:9/debian-security/dists/bookworm-security/InRelease" in str(
        error.value
    )
    assert "\n" not in str(error.value)


def test_an_older_installed_package_is_pending(real_lists):
    index = updates.read_apt_lists(real_lists, SUITE)
    assert index is not None and index.suite == "bookworm-security" and index.date
    assert len(index.packages) > 100
    name, newest = next(iter(sorted(index.packages.items())))
    installed = {name: f"{newest}~older", "not-in-the-index": "1.0"}
    assert updates.pending_updates(installed, index) == [f"{name} {newest}~older < {newest}"]
    assert updates.pending_updates({name: newest}, index) == []
    assert updates.pending_updates({name: f"{newest}+local1"}, index) == []


def test_lists_without_a_security_suite_have_no_index(tmp_path):
    assert updates.read_apt_lists(tmp_path, SUITE) is None


def test_dpkg_query_listing_keeps_installed_packages_only():
    listing = "ii  openssl 3.0.17-1~deb12u3\nrc  oldpkg 1.0\nii  zlib1g 1:1.2.13.dfsg-1\n"
    assert updates.parse_dpkg_query(listing) == {
        "openssl": "3.0.17-1~deb12u3",
        "zlib1g": "1:1.2.13.dfsg-1",
    }
