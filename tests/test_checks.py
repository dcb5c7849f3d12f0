"""Validator checks, in the parts that run without a VM: real commands on this machine."""

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from factory.validate.jupyter import http_status_command
from factory.validate.target import LocalTarget

TOKEN = "f00dfeed" * 6


class TokenOnly(BaseHTTPRequestHandler):
    """Jupyter's /api/status in miniature: 200 with the token header, 403 without."""

    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == f"token {TOKEN}"
        self.send_response(200 if ok else 403)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_the_token_goes_to_curl_on_stdin_never_on_its_command_line():
    server = HTTPServer(("127.0.0.1", 0), TokenOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/api/status"
        command = http_status_command(url, headers_on_stdin=True)
        assert TOKEN not in command and "$(" not in command
        target = LocalTarget()
        with_token = target.run(command, stdin=f"Authorization: token {TOKEN}\n")
        assert with_token.stdout == "200", with_token
        assert target.run(http_status_command(url)).stdout == "403"
    finally:
        server.shutdown()
        server.server_close()
