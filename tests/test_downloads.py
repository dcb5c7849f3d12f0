"""factory.download against a real local HTTP server and real files: one retry policy, a
unique temporary file per download, and errors that name what was fetched."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path

import pytest

from factory import download
from factory.download import ChecksumMismatch, Unreachable, fetch_verified, stream_to
from factory.errors import FactoryError

PAYLOAD = b"factory download test payload\n" * 4096
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    failures: list[int] = []  # status codes to answer before serving the payload
    requests = 0
    delay = 0.0  # seconds between the two halves of the body, to make fetches overlap

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests += 1
        if self.failures:
            self.send_error(self.failures.pop(0))
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        half = len(PAYLOAD) // 2
        self.wfile.write(PAYLOAD[:half])
        self.wfile.flush()
        time.sleep(self.delay)
        self.wfile.write(PAYLOAD[half:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.0)
    _Handler.failures, _Handler.requests, _Handler.delay = [], 0, 0.0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/files/payload.bin"
    httpd.shutdown()
    httpd.server_close()


def test_two_concurrent_fetches_into_one_dest_both_succeed(server, tmp_path):
    _Handler.delay = 0.3  # both downloads are in flight at once
    dest = tmp_path / "payload.bin"
    results, errors = [], []

    def fetch():
        try:
            results.append(fetch_verified(server, PAYLOAD_SHA, dest, what="x", log=print))
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results == [dest, dest]
    assert _Handler.requests == 2
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == ["payload.bin"]  # no partial left


def test_an_existing_verified_dest_is_not_fetched_again(server, tmp_path):
    dest = tmp_path / "payload.bin"
    dest.write_bytes(PAYLOAD)
    assert fetch_verified(server, PAYLOAD_SHA.upper(), dest, what="x") == dest
    assert _Handler.requests == 0


def test_a_corrupt_dest_is_replaced(server, tmp_path):
    dest = tmp_path / "payload.bin"
    dest.write_bytes(b"truncated")
    assert fetch_verified(server, PAYLOAD_SHA, dest, what="x").read_bytes() == PAYLOAD


def test_a_wrong_sha256_fails_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "payload.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as error:
        fetch_verified(server, wrong, dest, what="the test file")
    assert error.value.actual == PAYLOAD_SHA
    message = str(error.value)
    assert "the test file" in message and server in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_server_errors_are_retried(server, tmp_path):
    _Handler.failures = [503, 502, 429]
    dest = fetch_verified(server, PAYLOAD_SHA, tmp_path / "p.bin", what="x")
    assert dest.read_bytes() == PAYLOAD
    assert _Handler.requests == 4


def test_retries_end_after_a_few_attempts(server, tmp_path):
    _Handler.failures = [503] * (download.ATTEMPTS + 1)
    with pytest.raises(Unreachable, match=r"cannot download x from .*HTTP 503.*4 attempts"):
        fetch_verified(server, PAYLOAD_SHA, tmp_path / "p.bin", what="x")
    assert _Handler.requests == download.ATTEMPTS
    assert list(tmp_path.iterdir()) == []


def test_404_is_not_retried(server, tmp_path):
    _Handler.failures = [404]
    with pytest.raises(Unreachable, match=r"^cannot download the image from http://.*HTTP 404"):
        fetch_verified(server, PAYLOAD_SHA, tmp_path / "p.bin", what="the image")
    assert _Handler.requests == 1


def test_file_urls_are_fetched_and_a_missing_one_fails_at_once(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "copy.bin"
    assert fetch_verified(source.as_uri(), PAYLOAD_SHA, dest, what="x").read_bytes() == PAYLOAD
    started = time.monotonic()
    with pytest.raises(Unreachable, match=r"nope\.bin"):
        fetch_verified((tmp_path / "nope.bin").as_uri(), PAYLOAD_SHA, dest.with_name("n"), what="x")
    assert time.monotonic() - started < 1.0


def test_a_full_disk_is_not_retried_as_a_network_error():
    started = time.monotonic()
    with pytest.raises(FactoryError) as error:
        stream_to("file:///etc/os-release", Path("/dev/full"), "x")
    message = str(error.value)
    assert "No space left on device" in message and "network" not in message, message
    assert not isinstance(error.value, Unreachable)
    assert time.monotonic() - started < 1.0  # no retries with backoff
