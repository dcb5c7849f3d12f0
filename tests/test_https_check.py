"""The https check trusts what the machine holds: a client's certificate chain, served
without its root, verifies against the leaf's own DNS name over a real TLS connection."""

import datetime
import socket
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factory.validate.https import certificate_name
from factory.validate.web import http_request, tls_context

NOW = datetime.datetime.now(datetime.UTC)


def _issue(subject, issuer_key, issuer_name, ca, dns=None):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _serve_once(tmp_path, chain_pem, key):
    (tmp_path / "chain.pem").write_text(chain_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))

    def answer():
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(4096)
            tls.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        listener.close()

    threading.Thread(target=answer, daemon=True).start()
    return listener.getsockname()


def test_a_client_chain_without_its_root_verifies_against_the_leaf_name(tmp_path):
    root_key, root = _issue("Bank Root CA", None, None, ca=True)
    mid_key, mid = _issue("Bank Issuing CA", root_key, root.subject, ca=True)
    leaf_key, leaf = _issue("jupyter", mid_key, mid.subject, ca=False, dns=["jupyter.bank.example"])
    chain = _pem(leaf) + _pem(mid)  # what /etc/factory/tls/jupyter.crt holds: no root
    name = certificate_name(chain, "bank-credit-risk-v2")
    assert name == "jupyter.bank.example"
    address = _serve_once(tmp_path, chain, leaf_key)
    answer = http_request(address, "/", tls=tls_context(chain), server_name=name)
    assert answer.status == 403


def test_the_first_boot_certificate_keeps_the_hostname():
    key, cert = _issue("demo-hello-v1", None, None, ca=False, dns=["demo-hello-v1", "localhost"])
    assert certificate_name(_pem(cert), "demo-hello-v1") == "demo-hello-v1"


def test_a_websocket_upgrade_answer_returns_without_waiting_for_frames():
    """nginx answers 101 and keeps the connection open for frames; the request returns at
    once with the status instead of reading a body that never ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def answer():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        done.wait(30)  # the connection stays open, as a websocket's does
        conn.close()
        listener.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        upgrade = http_request(
            listener.getsockname(), "/api/events/subscribe", {"Upgrade": "websocket"}, timeout=10
        )
    finally:
        done.set()
    assert (upgrade.status, upgrade.headers["upgrade"], upgrade.body) == (101, "websocket", "")
