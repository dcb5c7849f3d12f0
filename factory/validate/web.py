"""One HTTP request from the validator to a port of the machine under test (http.client),
with TLS pinned to the certificate the machine holds."""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass

BODY_LIMIT = 65536  # enough for every page a check reads (node exporter metrics included)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: str
    peer_cert: bytes | None = None  # DER, for TLS


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address (a forwarded port on 127.0.0.1) that asks for, and verifies, a
    different server name than the address."""

    def __init__(
        self, address: tuple[str, int], server_name: str | None, **options: object
    ) -> None:
        super().__init__(address[0], address[1], **options)  # type: ignore[arg-type]
        self.server_name = server_name or address[0]

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=self.server_name
        )


def http_request(
    address: tuple[str, int],
    path: str,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
    timeout: float = 30,
) -> Answer:
    """GET `path`; the answer's head and up to BODY_LIMIT bytes of its body. A 101 (websocket
    upgrade) answer is returned without waiting for frames."""
    connection: http.client.HTTPConnection
    if tls is not None:
        connection = _NamedHTTPSConnection(address, server_name, context=tls, timeout=timeout)
    else:
        connection = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    sent = {"Host": server_name or address[0], **(headers or {})}
    if "Upgrade" not in sent:
        sent["Connection"] = "close"
    try:
        connection.request("GET", path, headers=sent)
        peer_cert = None
        if tls is not None:
            peer_cert = connection.sock.getpeercert(binary_form=True)
        response = connection.getresponse()
        body = b"" if response.status == 101 else response.read(BODY_LIMIT)
    except http.client.HTTPException as error:
        raise ConnectionError(f"no HTTP answer ({type(error).__name__}: {error})") from None
    finally:
        connection.close()
    answer_headers = {name.lower(): value for name, value in response.getheaders()}
    return Answer(response.status, answer_headers, body.decode(errors="replace"), peer_cert)


def tls_context(cert_pem: str) -> ssl.SSLContext:
    """Trust exactly the certificate (chain) the machine holds: its leaf, or a client's chain
    without its root (partial chains allowed), and check the name the leaf is issued for."""
    context = ssl.create_default_context(cadata=cert_pem)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = True
    return context


def unverified_tls() -> ssl.SSLContext:
    """TLS that asks for no identity: a first boot's self-signed certificate, probed only for
    an answer."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
