"""Tests for the base OS stage: cloud image downloads (fast) and the real Debian build (e2e)."""

import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from factory import base, download
from factory.base import debian, recipe
from factory.cache import CACHE_ENV_VAR, cache_dir, sha256_file
from factory.errors import FactoryError, ToolError

PAYLOAD = b"QFI\xfb not really a qcow2, but bytes are bytes\n" * 1000
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV_VAR, str(cache))
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.0)
    assert cache_dir() == cache.resolve()
    return cache


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "src" / "cloud image.qcow2"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


def _downloads(cache: Path) -> list[str]:
    folder = cache / "downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_file_url_is_downloaded_verified_and_reused(tmp_cache, image_file):
    lines = []
    path = base.cloud_base_image(image_file.as_uri(), PAYLOAD_SHA, log=lines.append)
    assert path == tmp_cache.resolve() / "downloads" / f"{PAYLOAD_SHA}.qcow2"
    assert path.read_bytes() == PAYLOAD
    assert lines, "progress goes to log()"

    mtime = path.stat().st_mtime_ns
    os.utime(image_file, None)
    image_file.write_bytes(b"changed at the source, must not be fetched again")
    again = base.cloud_base_image(image_file.as_uri(), PAYLOAD_SHA.upper(), log=lines.append)
    assert again == path
    assert again.stat().st_mtime_ns == mtime
    assert again.read_bytes() == PAYLOAD
    assert _downloads(tmp_cache) == [path.name]


def test_corrupt_cached_download_is_fetched_again(tmp_cache, image_file):
    path = base.cloud_base_image(image_file.as_uri(), PAYLOAD_SHA, log=lambda _: None)
    path.write_bytes(b"bit rot")
    lines = []
    assert base.cloud_base_image(image_file.as_uri(), PAYLOAD_SHA, log=lines.append) == path
    assert sha256_file(path) == PAYLOAD_SHA
    assert any("corrupt" in line for line in lines)


def test_wrong_checksum_raises_and_leaves_nothing(tmp_cache, image_file):
    wrong = "0" * 64
    with pytest.raises(FactoryError) as info:
        base.cloud_base_image(image_file.as_uri(), wrong, log=lambda _: None)
    message = str(info.value)
    assert message.startswith("base.sha256: checksum mismatch for ")
    assert f"expected {wrong}, got {PAYLOAD_SHA}" in message
    assert "\n" not in message
    assert _downloads(tmp_cache) == []


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x.qcow2", "/srv/images/x.qcow2", "example.com/x.qcow2", "", "file:"],
)
def test_bad_url_scheme_is_refused(tmp_cache, url):
    with pytest.raises(FactoryError, match=r"^base\.url: ") as info:
        base.cloud_base_image(url, PAYLOAD_SHA, log=lambda _: None)
    assert "\n" not in str(info.value)
    assert _downloads(tmp_cache) == []


@pytest.mark.parametrize("sha", ["", "abc", "g" * 64, "0" * 63, "0" * 65, None])
def test_bad_sha256_is_refused(tmp_cache, image_file, sha):
    with pytest.raises(FactoryError, match=r"^base\.sha256: .*64 hex"):
        base.cloud_base_image(image_file.as_uri(), sha, log=lambda _: None)


def test_missing_file_is_a_one_line_error(tmp_cache, tmp_path):
    url = (tmp_path / "nope.qcow2").as_uri()
    with pytest.raises(FactoryError, match=r"^base\.url: cannot download .*nope\.qcow2"):
        base.cloud_base_image(url, PAYLOAD_SHA, log=lambda _: None)
    assert _downloads(tmp_cache) == []


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    failures: list[int] = []  # status codes to answer before serving the payload
    requests = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests += 1
        if self.failures:
            self.send_error(self.failures.pop(0))
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FlakyHandler.requests = 0
    yield f"http://127.0.0.1:{server.server_address[1]}/images/debian.img"
    server.shutdown()
    server.server_close()


def test_http_download_retries_server_errors(tmp_cache, http_server):
    _FlakyHandler.failures = [503, 502]
    path = base.cloud_base_image(http_server, PAYLOAD_SHA, log=lambda _: None)
    assert path.name == f"{PAYLOAD_SHA}.img"
    assert path.read_bytes() == PAYLOAD
    assert _FlakyHandler.requests == 3


def test_http_download_gives_up_after_retries(tmp_cache, http_server):
    _FlakyHandler.failures = [503] * (download.ATTEMPTS)
    with pytest.raises(FactoryError, match=r"^base\.url: cannot download .*HTTP 503"):
        base.cloud_base_image(http_server, PAYLOAD_SHA, log=lambda _: None)
    assert _FlakyHandler.requests == download.ATTEMPTS
    assert _downloads(tmp_cache) == []


def test_http_404_is_not_retried(tmp_cache, http_server):
    _FlakyHandler.failures = [404]
    with pytest.raises(FactoryError, match=r"^base\.url: cannot download .*HTTP 404"):
        base.cloud_base_image(http_server, PAYLOAD_SHA, log=lambda _: None)
    assert _FlakyHandler.requests == 1


def test_unknown_release_and_bad_mirror_are_refused(tmp_cache):
    with pytest.raises(FactoryError, match=r"^base\.release: .*debian-12"):
        base.debian_base_image("debian-99", log=lambda _: None)
    with pytest.raises(FactoryError, match=r"^base\.mirror: "):
        base.debian_base_image(mirror="deb.debian.org/debian", log=lambda _: None)


def test_debian_build_needs_root(tmp_cache, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ToolError, match="needs root"):
        base.debian_base_image(log=lambda _: None)
    assert not list((tmp_cache / "base").glob("*.qcow2"))


def test_debian_build_names_missing_tools(tmp_cache, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        shutil, "which", lambda tool, path=None: None if tool == "mmdebstrap" else tool
    )
    with pytest.raises(ToolError, match=r"mmdebstrap not found.*apt-get install -y mmdebstrap"):
        base.debian_base_image(log=lambda _: None)


def test_cached_debian_image_is_reused_without_root(tmp_cache, monkeypatch):
    """A valid cache entry needs neither root nor tools; a corrupt one triggers a rebuild."""
    built = []

    def fake_build(workdir, suite, mirror, run, packages):
        built.append(suite)
        out = workdir / "disk.qcow2"
        out.write_bytes(b"image")
        return out

    monkeypatch.setattr(recipe, "build_disk", fake_build)
    monkeypatch.setattr(debian, "check_build_host", lambda: None)
    first = base.debian_base_image(log=lambda _: None)
    sidecar = json.loads(first.with_suffix(".json").read_text())
    assert sidecar["sha256"] == sha256_file(first) and sidecar["size"] == 5
    assert sidecar["inputs"]["suite"] == "bookworm"
    assert first.parent == tmp_cache.resolve() / "base"
    assert first.name.startswith("debian-12-")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert base.debian_base_image(log=lambda _: None) == first
    assert built == ["bookworm"]

    first.write_bytes(b"corrupt")
    lines = []
    assert base.debian_base_image(log=lines.append) == first
    assert built == ["bookworm", "bookworm"]
    assert any("corrupt" in line for line in lines)
    assert first.read_bytes() == b"image"
    assert not list(first.parent.glob(".build-*"))

    other = base.debian_base_image(mirror="https://deb.debian.org/debian", log=lambda _: None)
    assert other != first
    # The security suite's index is part of the key: a new security update makes a new base.
    inputs = json.loads(other.with_suffix(".json").read_text())["inputs"]
    assert inputs["security_index"]["suite"] == "bookworm-security"
    assert "deb https://deb.debian.org/debian-security bookworm-security main" in " ".join(
        inputs["sources"]
    )
    layer = base.debian_base_image(log=lambda _: None, extra_packages=("nvidia-smi",))
    assert layer != first
    assert "nvidia-smi" in json.loads(layer.with_suffix(".json").read_text())["inputs"]["packages"]


def test_failed_debian_build_leaves_no_cache_entry(tmp_cache, monkeypatch):
    def failing_build(workdir, suite, mirror, run, packages):
        (workdir / "disk.raw").write_bytes(b"partial")
        raise ToolError("mmdebstrap failed (exit 1): E: boom; full log: x")

    monkeypatch.setattr(recipe, "build_disk", failing_build)
    monkeypatch.setattr(debian, "check_build_host", lambda: None)
    with pytest.raises(ToolError, match="boom"):
        base.debian_base_image(log=lambda _: None)
    leftovers = [p.name for p in (tmp_cache / "base").iterdir()]
    assert not [name for name in leftovers if name.endswith((".qcow2", ".json"))]
    assert not [name for name in leftovers if name.startswith(".build-")]


def test_any_edit_to_the_recipe_file_changes_the_fingerprint(tmp_path):
    assert debian.recipe_fingerprint() == debian.recipe_fingerprint()
    assert debian.recipe_fingerprint().startswith(debian.RECIPE_VERSION + "-")
    copy = tmp_path / "recipe.py"
    copy.write_text(Path(recipe.__file__).read_text())
    assert debian.recipe_fingerprint(copy) == debian.recipe_fingerprint()
    # A helper added to the recipe file changes the key without being listed anywhere.
    copy.write_text(copy.read_text() + "\n\ndef new_helper() -> None:\n    pass\n")
    assert debian.recipe_fingerprint(copy) != debian.recipe_fingerprint()


@pytest.mark.e2e
def test_real_debian_base_image_build():
    """Builds (or reuses) the real base image in the shared default cache."""
    if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
        pytest.skip("needs root and mmdebstrap")
    image = base.debian_base_image()
    assert image.parent == cache_dir() / "base"
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == base.DISK_SIZE_GIB << 30 == 4 << 30
    sidecar = json.loads(image.with_suffix(".json").read_text())
    assert sidecar["sha256"] == sha256_file(image)
    assert sidecar["size"] == image.stat().st_size


@pytest.fixture
def fake_mmdebstrap(tmp_path, monkeypatch):
    """A stand-in mmdebstrap that writes a tiny rootfs tarball with no kernel in it."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "mmdebstrap"
    script.write_text(
        "#!/bin/sh\n"
        "# mmdebstrap [options] SUITE TARGET SOURCES...: TARGET is the tarball argument\n"
        'for arg; do case "$arg" in *.tar) out=$arg;; esac; done\n'
        "root=$(mktemp -d)\n"
        'mkdir -p "$root/etc" "$root/boot" "$root/dev" "$root/proc" "$root/sys"\n'
        'tar -C "$root" -cf "$out" . && rm -rf "$root"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")


def _assert_nothing_left(cache: Path) -> None:
    base_dir = (cache / "base").resolve()
    with open("/proc/self/mounts") as handle:
        assert str(base_dir) not in handle.read()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(base_dir) not in loops
    names = [p.name for p in base_dir.iterdir()]
    assert not [n for n in names if n.startswith(".build-") or n.endswith((".qcow2", ".json"))]


def test_failing_build_unmounts_and_detaches(tmp_cache, fake_mmdebstrap):
    with pytest.raises(ToolError, match=r"no kernel .*full log: .*\.log$") as info:
        base.debian_base_image(log=lambda _: None)
    assert "\n" not in str(info.value)
    _assert_nothing_left(tmp_cache)


@pytest.mark.parametrize("how", ["sigint", "sigterm"])
def test_interrupted_build_unmounts_and_detaches(tmp_cache, fake_mmdebstrap, monkeypatch, how):
    def interrupted(mnt, root_uuid, run):
        assert (mnt / "dev" / "null").exists(), "runs with the bind mounts in place"
        if how == "sigint":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM was not turned into SystemExit")

    monkeypatch.setattr(recipe, "configure_rootfs", interrupted)
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt if how == "sigint" else SystemExit):
        base.debian_base_image(log=lambda _: None)
    _assert_nothing_left(tmp_cache)
    assert signal.getsignal(signal.SIGTERM) == sigterm_handler
