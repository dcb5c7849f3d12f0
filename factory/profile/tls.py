"""The client's own TLS certificate and key for Jupyter's HTTPS, checked before anything is
built: nginx reads both at boot, unattended.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from factory.errors import ProfileError
from factory.profile.documents import MAX_TEXT_BYTES, Document, location_in, read_file
from factory.profile.sections import TLS


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_client_tls(chain: list[Document], tls: TLS) -> None:
    """The client's certificate is a PEM chain whose leaf has not expired, and its key an
    unencrypted PEM private key of that leaf (nginx reads both at boot, unattended)."""
    cert_at = location_in(chain, ("jupyter", "tls", "certificate"))
    key_at = location_in(chain, ("jupyter", "tls", "key"))
    cert_path, key_path = Path(tls.certificate), Path(tls.key)
    pem = read_file(cert_path, cert_at, MAX_TEXT_BYTES, "certificate")
    if b"PRIVATE KEY-----" in pem:
        raise ProfileError(
            f"{cert_at}: {cert_path.name} also holds a private key, and the certificate is "
            "installed world-readable; keep only the certificates in it and the key in "
            "jupyter.tls.key"
        )
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        raise ProfileError(
            f"{cert_at}: {cert_path.name} is not a PEM certificate chain (-----BEGIN "
            "CERTIFICATE-----, leaf first); convert it with `openssl x509 -outform PEM`"
        ) from None
    expiry = leaf.not_valid_after_utc
    if expiry <= datetime.now(UTC):
        raise ProfileError(
            f"{cert_at}: {cert_path.name} expired on {expiry:%Y-%m-%d}; renew the certificate"
        )
    try:
        key = serialization.load_pem_private_key(
            read_file(key_path, key_at, MAX_TEXT_BYTES, "private key"), password=None
        )
    except TypeError:
        raise ProfileError(
            f"{key_at}: {key_path.name} is encrypted, and nginx starts unattended; give it "
            "unencrypted (`openssl pkey -in KEY -out KEY.pem`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ProfileError(
            f"{key_at}: {key_path.name} is not a PEM private key (-----BEGIN PRIVATE "
            "KEY-----); export the key as PEM"
        ) from None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise ProfileError(
            f"{key_at}: {key_path.name} is not the key of {cert_path.name}'s first "
            "certificate; name the key that certificate was issued for"
        )
