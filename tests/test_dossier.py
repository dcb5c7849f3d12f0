"""handover.html in a real headless Chromium: it renders, prints to PDF, every link resolves
(anchors to their sections, files to this folder), and loading it sends no request anywhere.
A proxy that records every connection stands in for the network; a page with one remote image
proves the proxy sees what a browser fetches. The demo's own dossier is checked after its
validation (test_the_validated_demo_dossier)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

from factory.dossier import DOSSIER_FILE, write_dossier
from tests.conftest import DEMO_PROFILE, demo_variant, run_factory
from tests.validate.conftest import copy_delivery

CHROMIUM = shutil.which("chromium-headless-shell")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium-headless-shell missing: `make setup`"
)


class Links(HTMLParser):
    """The page's hrefs and srcs, and the ids its anchors may point at."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        for name in ("href", "src"):
            if values.get(name):
                self.links.append(values[name])


class RecordingProxy:
    """A listening socket that records the first line of each request a browser sends."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                try:
                    line = connection.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                except OSError:
                    line = "(no request line)"
                self.requests.append(line)
                connection.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


def open_in_chromium(page: Path, out: Path) -> tuple[str, Path, list[str]]:
    """(the rendered DOM, a PDF print of the page, the requests it made)."""
    proxy = RecordingProxy()
    profile_dir = tempfile.mkdtemp(prefix="factory-chromium-")
    common = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", f"--user-data-dir={profile_dir}",
        f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
        "--virtual-time-budget=5000",
    ]  # fmt: skip
    try:
        dom = subprocess.run(
            [*common, "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        pdf = out / "page.pdf"
        subprocess.run(
            [*common, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri()],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        return dom, pdf, list(proxy.requests)
    finally:
        proxy.close()
        shutil.rmtree(profile_dir, ignore_errors=True)


def check_dossier(folder: Path, tmp_path: Path) -> str:
    """Open folder/handover.html in Chromium and check it; returns the rendered DOM."""
    dom, pdf, requests = open_in_chromium(folder / DOSSIER_FILE, tmp_path)
    assert requests == [], f"the page reached out: {requests}"
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.read_bytes().count(b"/Type /Page") >= 2
    parsed = Links()
    parsed.feed(dom)
    assert parsed.links, "no links rendered"
    for link in parsed.links:
        assert "://" not in link, f"a link leaves the folder: {link}"
        if link.startswith("#"):
            assert link[1:] in parsed.ids, f"{link} names no section"
        else:
            assert (folder / link).exists(), f"{link} is not in {folder}"
    return dom


@pytest.fixture
def recorded_delivery(tmp_path) -> Path:
    folder = copy_delivery(tmp_path / "demo_hello_v1")
    write_dossier(folder)
    return folder


@needs_chromium
def test_dossier_renders_offline_prints_and_its_links_resolve(recorded_delivery, tmp_path):
    dom = check_dossier(recorded_delivery, tmp_path)
    for section in ("Artifacts", "Build record", "Validation", "Import steps", "Licences"):
        assert f">{section}</h2>" in dom
    assert "qm importovf VMID demo_hello_v1.ovf" in dom
    assert "qemu-img convert -p -f qcow2 -O vhdx demo_hello_v1.qcow2" in dom
    assert "cat jupyter-token" in dom
    assert "passed" in dom and "not validated yet" not in dom.lower()


@needs_chromium
def test_the_proxy_sees_a_page_that_reaches_out(recorded_delivery, tmp_path):
    page = recorded_delivery / DOSSIER_FILE
    page.write_text(
        page.read_text().replace("<body>", '<body><img src="http://factory.test/x.png">')
    )
    _dom, _pdf, requests = open_in_chromium(page, tmp_path)
    assert any("factory.test" in line for line in requests), requests


def test_a_dossier_before_validation_says_so(recorded_delivery):
    (recorded_delivery / "report.json").unlink()
    html = (recorded_delivery / DOSSIER_FILE).read_text()
    assert "Not validated yet" not in html
    write_dossier(recorded_delivery)
    assert "Not validated yet" in (recorded_delivery / DOSSIER_FILE).read_text()


@pytest.mark.e2e
@needs_chromium
def test_the_validated_demo_dossier(demo_validation, demo_delivery, tmp_path):
    """The demo's handover.html, rewritten by `factory validate`: its results, the environments
    read back from the image, and the SBOM's licences, checked in Chromium."""
    assert demo_validation.returncode == 0
    dom = check_dossier(demo_delivery, tmp_path)
    assert "sbom: lists every package in the image, and nothing else" in dom
    assert "envs/demo.installed.json" in dom
    assert "tabulate" in dom and "sbom.cdx.json" in dom
    assert "Base image" in dom
    assert "The delivery is signed" in dom and "openssl dgst -sha256 -verify" in dom


@pytest.mark.e2e
def test_verify_profile_says_whether_the_delivery_is_current(
    demo_delivery, demo_validation, tmp_path
):
    """The validated demo is current for its profile; a profile with one more package is not,
    and the finding names the layer that differs. (Here, before test_e2e.py's re-export
    writes the OVA again: the report is then for another OVA, and verify says so.)"""
    assert demo_validation.returncode == 0, demo_validation.stdout
    current = run_factory("verify", str(demo_delivery), "--profile", str(DEMO_PROFILE))
    assert current.returncode == 0, current.stdout + current.stderr
    assert "built from the 6 layers demo.yaml makes now" in current.stdout
    assert "demo_hello_v1.ova passed" in current.stdout
    assert "is current for" in current.stdout

    changed = demo_variant(tmp_path, lambda p: p["environments"][0]["pip"].append("idna"))
    stale = run_factory("verify", str(demo_delivery), "--profile", str(changed))
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert "layer 'env demo' differs" in stale.stdout, stale.stdout
    assert "verification failed for manifest.json" in stale.stderr
