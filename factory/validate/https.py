"""nginx in front of Jupyter: it serves the certificate the machine holds, wants the token,
redirects plain HTTP and passes websockets through. Asked from outside, as a browser would."""

from __future__ import annotations

import ssl
import time

from cryptography import x509

from factory.image_layout import TLS_CERTIFICATE
from factory.validate.context import (
    FAILED,
    SKIPPED,
    CheckContext,
    CheckResult,
    jupyter_token,
    result,
)
from factory.validate.jupyter import START_SECONDS
from factory.validate.web import tls_context

GROUP = "https"
# nginx's answers while Jupyter behind it is not listening yet.
UPSTREAM_NOT_READY = (502, 503, 504)
WEBSOCKET_UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "ZmFjdG9yeS12YWxpZGF0ZQ==",
    "Sec-WebSocket-Version": "13",
}


def certificate_name(cert_pem: str, hostname: str) -> str:
    """The name to ask the server for: the machine's hostname when the leaf certificate is
    issued for it, else the leaf's first DNS name (a client's certificate names its FQDN)."""
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem.encode())
        names = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except (ValueError, x509.ExtensionNotFound):
        return hostname
    return hostname if hostname in names or not names else names[0]


def check_https(ctx: CheckContext) -> list[CheckResult]:
    target = ctx.target
    if not ctx.loaded.profile.jupyter.enabled or not hasattr(target, "request"):
        reason = "jupyter.enabled is false" if hasattr(target, "request") else "ports not reachable"
        return [CheckResult("https: nginx in front of Jupyter", SKIPPED, reason, group=GROUP)]
    cert_pem = target.run(f"cat {TLS_CERTIFICATE}").stdout
    name = certificate_name(cert_pem, target.run("hostname").stdout.strip())
    token = jupyter_token(ctx)
    results = []
    try:
        context = tls_context(cert_pem)
        deadline = time.monotonic() + START_SECONDS
        while True:  # a first boot may still be starting Jupyter (`--only https` waits too)
            answer = target.request(443, "/api/status", tls=context, server_name=name, timeout=60)
            if answer.status not in UPSTREAM_NOT_READY or time.monotonic() > deadline:
                break
            time.sleep(5)
        served = ssl.DER_cert_to_PEM_cert(answer.peer_cert or b"").strip()
        same = served.split() == cert_pem.strip().split()
        results.append(
            result(
                "https: valid certificate chain for the machine's name",
                same,
                f"TLS to {name} verified against {TLS_CERTIFICATE}"
                + ("" if same else "; but nginx served another certificate"),
                GROUP,
            )
        )
        results.append(
            result(
                "https: a request without the token is refused",
                answer.status in (401, 403),
                f"GET /api/status without token -> HTTP {answer.status}",
                GROUP,
            )
        )
        authorisation = {"Authorization": f"token {token}"}
        authorised = target.request(
            443, "/api/status", authorisation, tls=context, server_name=name
        )
        results.append(
            result(
                "https: the first-boot token opens Jupyter",
                authorised.status == 200 and bool(token),
                f"GET /api/status with token -> HTTP {authorised.status}",
                GROUP,
            )
        )
        upgrade = target.request(
            443,
            "/api/events/subscribe",
            {**authorisation, **WEBSOCKET_UPGRADE},
            tls=context,
            server_name=name,
        )
        results.append(
            result(
                "https: websockets pass through nginx",
                upgrade.status == 101,
                f"websocket upgrade -> HTTP {upgrade.status}",
                GROUP,
            )
        )
    except (OSError, ssl.SSLError, ConnectionError, ValueError) as error:
        results.append(
            CheckResult(
                "https: valid certificate chain for the machine's name",
                FAILED,
                f"{type(error).__name__}: {error}",
                group=GROUP,
            )
        )
    try:
        plain = target.request(80, "/lab", server_name=name)
        location = plain.headers.get("location", "")
        ok = plain.status in (301, 308) and location.startswith(f"https://{name}/")
        detail = f"GET http://{name}/lab -> HTTP {plain.status} {location}"
    except (OSError, ConnectionError) as error:
        ok, detail = False, f"port 80: {error}"
    results.append(result("https: plain HTTP redirects to HTTPS", ok, detail, GROUP))
    return results
