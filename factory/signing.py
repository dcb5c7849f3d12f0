"""The delivery team's signing key: made by `factory keygen`, named by a profile's
`signing.key`, checked in pre-flight, and used to sign SHA256SUMS and the OVA's manifest.

The key is an RSA private key (PEM, PKCS#8); its self-signed X.509 certificate sits beside it
(the same path ending in .crt) and is the only part that reaches a delivery. Signatures are
RSA PKCS#1 v1.5 over SHA-256, which `openssl dgst -sha256 -verify` and vSphere check.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factory.errors import FactoryError, ProfileError
from factory.files import write_bytes_atomically, write_text_atomically

if TYPE_CHECKING:
    from factory.profile import LoadedProfile

KEY_BITS = 3072
CERTIFICATE_DAYS = 5 * 365
DEFAULT_SIGNER_NAME = "Delivery team"
# What a signed delivery holds beside SHA256SUMS: the detached signature and the public
# certificate that checks it.
SIGNATURE_FILE = "SHA256SUMS.sig"
CERTIFICATE_FILE = "signer.crt"
MAX_PEM_BYTES = 64 << 10


def certificate_path(key: Path) -> Path:
    """Where the certificate of a key lives: the same path ending in .crt."""
    return Path(key).with_suffix(".crt")


@dataclass(frozen=True)
class Signer:
    """A loaded signing key and its certificate."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def name(self) -> str:
        """The certificate's subject common name: the signer vCenter shows."""
        return subject_name(self.certificate)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, data: bytes) -> bytes:
        """RSA PKCS#1 v1.5 signature over the SHA-256 of `data`."""
        return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def subject_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


def fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 fingerprint as `openssl x509 -fingerprint -sha256` prints it."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def signature_matches(
    certificate: x509.Certificate, data: bytes, signature: bytes, algorithm: str = "sha256"
) -> bool:
    """Whether `signature` is the certificate's key's PKCS#1 v1.5 signature over `data`."""
    public = certificate.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        return False
    digest = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}[algorithm]
    try:
        public.verify(signature, data, padding.PKCS1v15(), digest)
    except InvalidSignature:
        return False
    return True


# --- keygen ---------------------------------------------------------------------------------


def git_would_track(path: Path) -> Path | None:
    """The git work tree that holds `path` without ignoring it, or None: a private key there
    is one `git add` away from being published."""
    folder = Path(path).parent
    while not folder.is_dir():
        folder = folder.parent

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)
        except FileNotFoundError:
            return None

    top = git("rev-parse", "--show-toplevel")
    if top is None or top.returncode != 0:
        return None
    ignored = git("check-ignore", "-q", str(Path(path).resolve()))
    return None if ignored is not None and ignored.returncode == 0 else Path(top.stdout.strip())


def generate_key(key_path: Path, name: str = DEFAULT_SIGNER_NAME) -> tuple[Path, Path]:
    """Write a new RSA key (mode 0600) and its self-signed certificate beside it; refuses to
    replace either, or to put the key where git would track it."""
    key_path = Path(key_path).expanduser().absolute()
    cert_path = certificate_path(key_path)
    if key_path == cert_path:
        raise FactoryError(
            f"{key_path}: a key cannot end in .crt; name it e.g. {key_path.stem}.key"
        )
    for path in (key_path, cert_path):
        if path.exists():
            raise FactoryError(
                f"{path} already exists; keygen never replaces a key or certificate: move it "
                "away first, or name another path"
            )
    if not name.strip() or any(ord(c) < 0x20 for c in name):
        raise FactoryError(f"--name {name!r}: give the delivery team's name on one line")
    tracked_by = git_would_track(key_path)
    if tracked_by is not None:
        raise FactoryError(
            f"{key_path} is inside the git checkout {tracked_by} and git does not ignore it; "
            "put the key outside it (e.g. ~/.config/factory/keys/) so it is never committed"
        )
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name.strip())])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_bytes_atomically(key_path, pem, mode=0o600)
    write_bytes_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


# --- loading the key a profile names --------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_PEM_BYTES)
    except OSError as error:
        raise ProfileError(
            f"signing.key: cannot read the {what} {path} ({error.strerror})"
        ) from None


def load_signer(key_path: Path) -> Signer:
    """The key a profile's signing.key names and its certificate, checked the way pre-flight
    needs them: present, private to their owner, out of git, matching, and not expired."""
    key_path = Path(key_path)
    cert_path = certificate_path(key_path)
    keygen = f'`factory keygen {key_path} --name "Your delivery team"`'
    if not key_path.is_file():
        raise ProfileError(f"signing.key: no key {key_path}; make one with {keygen}")
    if not cert_path.is_file():
        raise ProfileError(
            f"signing.key: no certificate {cert_path} beside the key; keygen writes both: move "
            f"the key away and run {keygen}"
        )
    if key_path.stat().st_mode & 0o077:
        raise ProfileError(
            f"signing.key: {key_path} can be read by other users; run `chmod 600 {key_path}`"
        )
    tracked_by = git_would_track(key_path)
    if tracked_by is not None:
        raise ProfileError(
            f"signing.key: {key_path} is inside the git checkout {tracked_by} and git does not "
            "ignore it; move it out (e.g. to ~/.config/factory/keys/) so it is never committed"
        )
    try:
        key = serialization.load_pem_private_key(_read(key_path, "key"), password=None)
    except TypeError:
        raise ProfileError(
            f"signing.key: {key_path.name} is encrypted, and builds sign unattended; give it "
            f"unencrypted with mode 0600 (`openssl pkey -in KEY -out {key_path.name}`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ProfileError(
            f"signing.key: {key_path.name} is not a PEM private key; make one with {keygen}"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ProfileError(
            f"signing.key: {key_path.name} is not an RSA key, and OVA signatures are RSA; make "
            f"one with {keygen}"
        )
    try:
        certificate = x509.load_pem_x509_certificate(_read(cert_path, "certificate"))
    except ValueError:
        raise ProfileError(
            f"signing.key: {cert_path.name} is not a PEM certificate; keygen writes one beside "
            "the key"
        ) from None
    if certificate.public_key() != key.public_key():
        raise ProfileError(
            f"signing.key: {cert_path.name} is not the certificate of {key_path.name}; put "
            "the key's own certificate beside it"
        )
    expiry = certificate.not_valid_after_utc
    if expiry <= datetime.now(UTC):
        raise ProfileError(
            f"signing.key: {cert_path.name} expired on {expiry:%Y-%m-%d}; make a new key with "
            f"{keygen} (after moving the old one away)"
        )
    return Signer(key, certificate)


def profile_signer(loaded: LoadedProfile) -> Signer | None:
    """The signer a profile names in signing.key, checked; None when the profile does not
    sign its deliveries."""
    signing = loaded.profile.signing
    return None if signing is None else load_signer(Path(signing.key))


def vendor(loaded: LoadedProfile, signer: Signer | None) -> str:
    """The OVA's Vendor: the profile's signing.vendor, else the signer's name; empty (left
    out) for an unsigned delivery: the client is not the vendor, and factory is only the tool."""
    signing = loaded.profile.signing
    if signing is not None and signing.vendor:
        return signing.vendor
    return signer.name if signer is not None else ""


# --- signing a delivery's SHA256SUMS --------------------------------------------------------


def sign_checksums(folder: Path, signer: Signer) -> list[Path]:
    """SHA256SUMS.sig (its detached signature) and signer.crt (the certificate, public part
    only) beside folder/SHA256SUMS."""
    folder = Path(folder)
    signature = signer.sign((folder / "SHA256SUMS").read_bytes())
    return [
        write_bytes_atomically(folder / SIGNATURE_FILE, signature),
        write_text_atomically(folder / CERTIFICATE_FILE, signer.certificate_pem.decode("ascii")),
    ]


def ova_certificate_text(signer: Signer, manifest_name: str, manifest: bytes) -> str:
    """The .cert member of a signed OVA, as ovftool writes it and vSphere reads it: the
    signature over the manifest's bytes, then the certificate."""
    signature = signer.sign(manifest).hex()
    return f"SHA256({manifest_name})= {signature}\n" + signer.certificate_pem.decode("ascii")


def verification_commands(name: str) -> str:
    """How a receiver checks a signed delivery NAME with openssl, sha256sum, tar and xxd
    alone, in the delivery folder (bash; the OVA is unpacked into a temporary folder). The
    signer is printed first, to compare with the fingerprint the delivery team gave."""
    return f"""\
tmp=$(mktemp -d)
openssl x509 -in {CERTIFICATE_FILE} -noout -subject -fingerprint -sha256
openssl x509 -in {CERTIFICATE_FILE} -noout -pubkey > "$tmp/signer.pub"
openssl dgst -sha256 -verify "$tmp/signer.pub" -signature {SIGNATURE_FILE} SHA256SUMS
sha256sum --strict -c SHA256SUMS
tar -xf {name}.ova -C "$tmp"
head -n 1 "$tmp/{name}.cert" | sed 's/^.*= //' | xxd -r -p > "$tmp/{name}.mf.sig"
openssl dgst -sha256 -verify "$tmp/signer.pub" -signature "$tmp/{name}.mf.sig" "$tmp/{name}.mf"
(cd "$tmp" && sed -E 's/^SHA256\\((.+)\\)= (.+)$/\\2  \\1/' {name}.mf | sha256sum --strict -c)
rm -r "$tmp"
"""
