"""The nginx site that 30-jupyter.sh writes, served by a real nginx on loopback ports: a
request that carries the Jupyter token in its query string and referer leaves no trace of it
in the access log."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from factory import image_layout
from factory.resources import PROVISIONERS_DIR

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
TOKEN = "0123456789abcdef" * 3


class Jupyter(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"lab")

    def log_message(self, *args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def jupyter_site(jupyter_port: int) -> str:
    """The site file exactly as the provisioner's heredoc expands it."""
    script = (PROVISIONERS_DIR / "30-jupyter.sh").read_text()
    heredoc = re.search(
        r"cat > /etc/nginx/sites-available/jupyter (<<NGINX\n.*?\nNGINX\n)", script, re.S
    )
    return subprocess.run(
        ["bash", "-c", "cat " + heredoc.group(1)],
        env={**os.environ, **image_layout.settings(), "JUPYTER_PORT": str(jupyter_port)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_the_token_never_reaches_the_access_log(tmp_path):
    upstream = HTTPServer(("127.0.0.1", 0), Jupyter)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    http_port, https_port = free_port(), free_port()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-keyout", str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.crt")],
        check=True,
        capture_output=True,
    )
    # Only where the site meets this host: ports, certificate paths, the log folder.
    site = jupyter_site(upstream.server_port)
    site = re.sub(r"\n\s*listen \[::\].*", "", site)
    site = site.replace("listen 80 ", f"listen 127.0.0.1:{http_port} ")
    site = site.replace("listen 443 ", f"listen 127.0.0.1:{https_port} ")
    site = site.replace("/etc/factory/tls/jupyter.", f"{tmp_path}/tls.")
    site = site.replace("/var/log/nginx/", f"{tmp_path}/")
    (tmp_path / "site.conf").write_text(site)
    temp_paths = "".join(
        f"{kind}_temp_path {tmp_path}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\ndaemon off;\n"
        f"events {{}}\nhttp {{\n{temp_paths}access_log {tmp_path}/access.log;\n"
        f"include {tmp_path}/site.conf;\n}}\n"
    )
    nginx = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", "nginx.conf"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"https://127.0.0.1:{https_port}/lab?token={TOKEN}"
        for _ in range(50):
            answer = subprocess.run(
                ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", url]
                + ["-H", f"Referer: https://localhost/lab/tree?token={TOKEN}"],
                capture_output=True,
                text=True,
            )
            if answer.stdout == "200":
                break
            assert nginx.poll() is None, nginx.stderr.read() if nginx.stderr else ""
            time.sleep(0.2)
        assert answer.stdout == "200"
    finally:
        nginx.terminate()
        nginx.wait(timeout=30)
        upstream.shutdown()
    log = (tmp_path / "jupyter-access.log").read_text()
    assert '"GET /lab HTTP/1.1" 200' in log
    assert TOKEN not in log and "token=" not in log
    for other in ("access.log", "error.log"):
        assert TOKEN not in Path(tmp_path / other).read_text()
