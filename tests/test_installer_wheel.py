"""The py-rattler wheel that installs every environment in the image is pinned by sha256 in
code: downloaded with pip --require-hashes, and a cached copy is checked before reuse."""

from importlib import metadata

import pytest

from factory import bundle
from factory.cache import sha256_file
from factory.errors import FactoryError

VERSION = metadata.version("py-rattler")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "installer" / f"py-rattler-{VERSION}"


def test_the_hosts_py_rattler_is_pinned():
    name, sha256 = bundle.INSTALLER_WHEELS[VERSION]
    assert name.startswith(f"py_rattler-{VERSION}-") and name.endswith("x86_64.whl")
    assert len(sha256) == 64


def test_a_tampered_cached_wheel_is_fetched_again(cache, tmp_path):
    name, sha256 = bundle.INSTALLER_WHEELS[VERSION]
    cache.mkdir(parents=True)
    (cache / name).write_bytes(b"not the wheel")
    (cache / "extra-0.1-py3-none-any.whl").write_bytes(b"planted")
    bundle._installer_wheels(tmp_path / "payload")
    assert sha256_file(cache / name) == sha256
    assert [p.name for p in (tmp_path / "payload").iterdir()] == [name]
    assert sha256_file(tmp_path / "payload" / name) == sha256


def test_pip_refuses_a_wheel_that_differs_from_the_pin(cache, tmp_path, monkeypatch):
    name, _ = bundle.INSTALLER_WHEELS[VERSION]
    monkeypatch.setitem(bundle.INSTALLER_WHEELS, VERSION, (name, "0" * 64))
    with pytest.raises(FactoryError, match="pip download failed for py-rattler-installer.txt"):
        bundle._installer_wheels(tmp_path / "payload")
    assert not list(cache.glob("*.whl"))


def test_an_unpinned_version_is_refused(cache, tmp_path):
    with pytest.raises(FactoryError, match="no pinned sha256 for the py-rattler 0.0.1 installer"):
        bundle._installer_wheels(tmp_path / "payload", version="0.0.1")
