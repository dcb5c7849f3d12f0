"""Signed deliveries, without a VM: `factory keygen`, the profile's signing section, the signed
OVA (SHA256 manifest and .cert in an OVF 1.0 package, with its ProductSection), the signed
SHA256SUMS, a re-export that signs again, and `factory verify`, each checked against real
files, real signatures and the openssl command line a receiver uses."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from factory.checksums import digests_of
from factory.delivery import Delivery, full_version, reexport, write_signed_checksums
from factory.errors import FactoryError, ProfileError
from factory.export import Product, VirtualHardware, export_ova
from factory.profile import load_profile
from factory.progress import Progress
from factory.signing import (
    CERTIFICATE_FILE,
    SIGNATURE_FILE,
    certificate_path,
    generate_key,
    load_signer,
    verification_commands,
)
from factory.verify import verify_delivery
from tests.conftest import REPO, run_factory
from tests.test_export import cot_info
from tests.test_profile import GOOD

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed (Debian: qemu-utils)"
)

OVF1 = "http://schemas.dmtf.org/ovf/envelope/1"
NAME = "acme_fraud_v2"
TEAM = "Acme delivery team"
HARDWARE = VirtualHardware(
    name=NAME,
    cpus=2,
    memory_mib=2048,
    disk_gib=1,
    product=Product(name="acme_fraud", version="v2", vendor=TEAM, full_version="0123abc"),
)


def quiet(*_args):
    pass


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    path, _ = generate_key(tmp_path_factory.mktemp("keys") / "team.key", TEAM)
    return path


@pytest.fixture(scope="module")
def signed(tmp_path_factory, key, disk) -> Path:
    """A delivery-like folder: a signed OVA, a qcow2, and a signed SHA256SUMS."""
    delivery = Delivery(tmp_path_factory.mktemp("signed") / NAME, NAME)
    signer = load_signer(key)
    export_ova(disk, HARDWARE, delivery.path, log=quiet, signer=signer)
    shutil.copy2(disk, delivery.qcow2)
    write_signed_checksums(delivery, digests_of(delivery.artifacts), signer)
    return delivery.path


@pytest.fixture
def copy(signed, tmp_path) -> Path:
    """A copy of the signed folder that a test may damage."""
    return Path(shutil.copytree(signed, tmp_path / NAME))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def failed(folder: Path, trusted: x509.Certificate | None = None) -> dict[str, str]:
    """What `factory verify` finds wrong: each failing file with its problems."""
    problems: dict[str, list[str]] = {}
    for finding in verify_delivery(folder, trusted):
        if not finding.ok:
            problems.setdefault(finding.name, []).append(finding.detail)
    return {name: "; ".join(details) for name, details in problems.items()}


def bash(script: str, folder: Path) -> subprocess.CompletedProcess:
    """`script` run as a receiver runs it, stopping at the first failure; its temporary
    folders go under `folder`'s parent."""
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=folder,
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(folder.parent)},
    )


def ova_members(ova: Path) -> dict[str, bytes]:
    with tarfile.open(ova) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


# --- keygen ---------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_and_its_self_signed_certificate(tmp_path):
    result = run_factory("keygen", str(tmp_path / "keys" / "team.key"), "--name", TEAM)
    assert result.returncode == 0, result.stderr
    key, cert = tmp_path / "keys" / "team.key", tmp_path / "keys" / "team.crt"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert "PRIVATE" not in cert.read_text()
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    assert certificate.subject == certificate.issuer
    assert certificate.subject.rfc4514_string() == f"CN={TEAM}"
    assert certificate.signature_hash_algorithm.name == "sha256"
    assert certificate.public_key().key_size >= 3072
    assert f"signing:\n    key: {key}" in result.stdout
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    assert fingerprint in result.stdout
    assert load_signer(key).name == TEAM


def test_keygen_never_replaces_a_key(tmp_path, key):
    before = key.read_bytes()
    result = run_factory("keygen", str(key))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {key} already exists; keygen never replaces a key or certificate: move it "
        "away first, or name another path"
    ]
    assert key.read_bytes() == before


def test_keygen_refuses_a_key_that_git_would_track(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    (tmp_path / "repo" / ".gitignore").write_text("/private/\n")
    result = run_factory("keygen", str(tmp_path / "repo" / "team.key"))
    assert result.returncode == 1
    assert "git does not ignore it" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "repo" / "team.key").exists()
    ignored = run_factory("keygen", str(tmp_path / "repo" / "private" / "team.key"))
    assert ignored.returncode == 0, ignored.stderr


# --- the profile's signing section and pre-flight -------------------------------------------


def test_the_key_path_is_made_absolute_from_the_profile_and_need_not_exist_to_load(tmp_path):
    (tmp_path / "p.yaml").write_text(GOOD + "signing: {key: keys/team.key, vendor: Acme}\n")
    signing = load_profile(tmp_path / "p.yaml").profile.signing
    assert signing.key == str(tmp_path / "keys" / "team.key")
    assert signing.vendor == "Acme"
    (tmp_path / "home.yaml").write_text(GOOD + "signing: {key: ~/team.key}\n")
    home_key = load_profile(tmp_path / "home.yaml").profile.signing.key
    assert home_key == str(Path("~/team.key").expanduser())


@pytest.mark.parametrize(
    "signing, message",
    [
        ("{vendor: Acme}", "signing.key: required field is missing (add it)"),
        ('{key: k.key, vendor: "a\\nb"}', "signing.vendor: must be a single line"),
        ("{key: k.key, name: x}", "signing.name"),
    ],
)
def test_a_bad_signing_section_is_one_line(tmp_path, signing, message):
    (tmp_path / "p.yaml").write_text(GOOD + f"signing: {signing}\n")
    with pytest.raises(ProfileError, match=re.escape(message)) as error:
        load_profile(tmp_path / "p.yaml")
    assert "\n" not in str(error.value)


def test_a_missing_key_stops_the_build_in_pre_flight(tmp_path):
    missing = tmp_path / "keys" / "team.key"
    (tmp_path / "p.yaml").write_text(GOOD + f"signing: {{key: {missing}}}\n")
    result = run_factory("build", str(tmp_path / "p.yaml"), "--outputs", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: signing.key: no key {missing}; make one with "
        f'`factory keygen {missing} --name "Your delivery team"`'
    ]
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == []


def test_a_signed_build_refuses_a_sha1_manifest_in_pre_flight(tmp_path, key):
    (tmp_path / "p.yaml").write_text(GOOD + f"signing: {{key: {key}}}\n")
    result = run_factory(
        "build", str(tmp_path / "p.yaml"), "--outputs", str(tmp_path), "--ova-digest", "sha1"
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: --ova-digest sha1: the profile signs its deliveries (signing.key), and a "
        "signed OVA carries a SHA256 manifest; leave --ova-digest out"
    ]


def test_an_unusable_key_is_refused_with_the_fix(tmp_path, key):
    other, _ = generate_key(tmp_path / "other.key")
    cases = tmp_path / "cases"
    cases.mkdir()
    readable = cases / "readable.key"
    shutil.copy(key, readable)
    shutil.copy(certificate_path(key), certificate_path(readable))
    readable.chmod(0o644)
    mismatched = cases / "mismatched.key"
    shutil.copy(key, mismatched)
    shutil.copy(certificate_path(other), certificate_path(mismatched))
    mismatched.chmod(0o600)
    no_cert = cases / "lonely.key"
    shutil.copy(key, no_cert)
    no_cert.chmod(0o600)
    encrypted = cases / "encrypted.key"
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    encrypted.chmod(0o600)
    shutil.copy(certificate_path(key), certificate_path(encrypted))
    for path, message in [
        (readable, f"can be read by other users; run `chmod 600 {readable}`"),
        (mismatched, "mismatched.crt is not the certificate of mismatched.key"),
        (no_cert, "no certificate"),
        (encrypted, "encrypted.key is encrypted, and builds sign unattended"),
    ]:
        with pytest.raises(ProfileError, match=re.escape(message)) as error:
            load_signer(path)
        assert str(error.value).startswith("signing.key: ")


def test_an_expired_certificate_is_refused(tmp_path, key):
    expired_key = tmp_path / "expired.key"
    shutil.copy(key, expired_key)
    expired_key.chmod(0o600)
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, TEAM)])
    long_ago = datetime.now(UTC) - timedelta(days=400)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(long_ago)
        .not_valid_after(long_ago + timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    certificate_path(expired_key).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ProfileError, match="expired.crt expired on"):
        load_signer(expired_key)


def test_full_version_is_the_building_revision():
    assert full_version({"revision": "abc", "dirty": False}) == "abc"
    assert full_version({"revision": "abc", "dirty": True}) == "abc-dirty"
    assert full_version(None).startswith("factory ")


# --- the signed OVA -------------------------------------------------------------------------


def test_a_signed_ova_is_ovf_1_0_with_a_sha256_manifest_and_its_cert_last(signed):
    ova = signed / f"{NAME}.ova"
    with tarfile.open(ova) as archive:
        names = archive.getnames()
    assert names == [f"{NAME}.ovf", f"{NAME}-disk1.vmdk", f"{NAME}.mf", f"{NAME}.cert"]
    members = ova_members(ova)
    assert ET.fromstring(members[f"{NAME}.ovf"]).tag == f"{{{OVF1}}}Envelope"
    assert members[f"{NAME}.mf"].decode().splitlines() == [
        f"SHA256({name})= {hashlib.sha256(members[name]).hexdigest()}" for name in names[:2]
    ]
    cert = members[f"{NAME}.cert"].decode()
    assert re.match(rf"^SHA256\({NAME}\.mf\)= [0-9a-f]{{768}}\n-----BEGIN CERTIFICATE-----", cert)
    assert cert.split("\n", 1)[1] == (signed / CERTIFICATE_FILE).read_text()
    assert "PRIVATE" not in cert


def test_the_product_section_names_product_vendor_version_and_revision(signed):
    root = ET.fromstring(ova_members(signed / f"{NAME}.ova")[f"{NAME}.ovf"])
    section = root.find(f"{{{OVF1}}}VirtualSystem/{{{OVF1}}}ProductSection")
    assert [(child.tag.split("}")[1], child.text) for child in section] == [
        ("Info", "Information about the installed software"),
        ("Product", "acme_fraud"),
        ("Vendor", TEAM),
        ("Version", "v2"),
        ("FullVersion", "0123abc"),
    ]


def test_cot_reads_vendor_version_and_revision_of_a_signed_ova(signed):
    result = cot_info(signed / f"{NAME}.ova", sha256_manifest=True)
    assert re.search(rf"Vendor:\s+{TEAM}\n", result.stdout), result.stdout
    assert re.search(r"Version:\s+v2\n\s+0123abc\n", result.stdout), result.stdout


def test_the_documented_openssl_commands_verify_a_signed_delivery(signed, copy):
    script = verification_commands(NAME)
    result = bash(script, signed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("Verified OK") == 2
    assert f"CN = {TEAM}" in result.stdout
    flip_byte(copy / "SHA256SUMS", 0)
    broken = bash(script, copy)
    assert broken.returncode != 0 and "Verification failure" in broken.stdout + broken.stderr


def test_openssl_refuses_a_cert_signature_over_another_manifest(signed, tmp_path):
    members = ova_members(signed / f"{NAME}.ova")
    signature = bytes.fromhex(members[f"{NAME}.cert"].split(b"\n", 1)[0].split(b"= ")[1].decode())
    (tmp_path / "sig").write_bytes(signature)
    (tmp_path / "mf").write_bytes(members[f"{NAME}.mf"].replace(b"SHA256(", b"SHA256 (", 1))
    result = bash(
        f"openssl x509 -in {signed / CERTIFICATE_FILE} -noout -pubkey > pub && "
        "openssl dgst -sha256 -verify pub -signature sig mf",
        tmp_path,
    )
    assert result.returncode == 1 and "Verification failure" in result.stdout


# --- factory verify -------------------------------------------------------------------------


def test_verify_passes_a_signed_delivery(signed):
    findings = verify_delivery(signed)
    assert all(f.ok for f in findings), findings
    assert {f.name for f in findings} == {
        f"{NAME}.ova",
        f"{NAME}.qcow2",
        CERTIFICATE_FILE,
        SIGNATURE_FILE,
    }
    result = run_factory("verify", str(signed))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"verified {signed}" in result.stdout
    assert TEAM in result.stdout


@pytest.mark.parametrize(
    "damaged, where",
    [
        (f"{NAME}.qcow2", lambda path: path.stat().st_size // 2),
        # A digit of the OVA's digest (line 1) that stays a hex digit when flipped.
        (
            "SHA256SUMS",
            lambda path: next(i for i, c in enumerate(path.read_text()) if c in "0123456789bcde"),
        ),
        (SIGNATURE_FILE, lambda path: 10),
    ],
)
def test_verify_names_the_one_file_with_a_flipped_byte(copy, damaged, where):
    flip_byte(copy / damaged, where(copy / damaged))
    problems = failed(copy)
    if damaged == "SHA256SUMS":  # its first line no longer names the OVA's digest
        assert problems.keys() == {f"{NAME}.ova", SIGNATURE_FILE}, problems
        assert "SHA256SUMS" in problems[f"{NAME}.ova"]
    else:
        assert problems.keys() == {damaged}, problems
    result = run_factory("verify", str(copy))
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failures) == len(problems)
    assert result.stderr.splitlines() == [
        f"error: {copy}: verification failed for {', '.join(problems)}"
    ]


def test_verify_names_the_ova_and_its_member_when_the_disk_inside_changes(copy):
    ova = copy / f"{NAME}.ova"
    with tarfile.open(ova) as archive:
        vmdk = archive.getmember(f"{NAME}-disk1.vmdk")
    flip_byte(ova, vmdk.offset_data + vmdk.size // 2)
    assert failed(copy) == {
        f"{NAME}.ova": "sha256 differs from SHA256SUMS: the file changed after it was "
        f"delivered; {NAME}-disk1.vmdk's sha256 differs from the manifest"
    }


def test_verify_fails_an_ova_signed_by_another_key_or_not_at_all(copy, disk, key, tmp_path):
    delivery, own = Delivery(copy, NAME), load_signer(key)
    other, _ = generate_key(tmp_path / "other.key", "Someone else")
    for ova_signer, problem in [
        (load_signer(other), f"is signed by another certificate than {CERTIFICATE_FILE}"),
        (None, "is not signed (no .cert member)"),
    ]:
        export_ova(disk, HARDWARE, copy, log=quiet, signer=ova_signer)
        write_signed_checksums(delivery, digests_of(delivery.artifacts), own)
        assert failed(copy) == {f"{NAME}.ova": problem}


def test_verify_with_the_trusted_certificate_refuses_another_signer(copy, key, tmp_path):
    trusted = x509.load_pem_x509_certificate(certificate_path(key).read_bytes())
    assert failed(copy, trusted) == {}
    other, other_cert = generate_key(tmp_path / "other.key", "Someone else")
    delivery = Delivery(copy, NAME)
    signer = load_signer(other)
    export_ova(copy / f"{NAME}.qcow2", HARDWARE, copy, log=quiet, signer=signer)
    write_signed_checksums(delivery, digests_of(delivery.artifacts), signer)
    problems = failed(copy, trusted)
    assert problems.keys() == {CERTIFICATE_FILE, f"{NAME}.ova"}
    assert "is not the trusted certificate" in problems[CERTIFICATE_FILE]
    assert problems[f"{NAME}.ova"] == f"is signed by another certificate than {CERTIFICATE_FILE}"
    result = run_factory("verify", str(copy), "--certificate", str(certificate_path(key)))
    assert result.returncode == 1


def test_verify_fails_an_unsigned_delivery(copy):
    (copy / SIGNATURE_FILE).unlink()
    problems = failed(copy)
    assert problems == {
        SIGNATURE_FILE: "missing: the delivery is not signed (its profile has no signing.key)"
    }


def test_verify_refuses_a_checksum_line_outside_the_delivery(copy):
    with open(copy / "SHA256SUMS", "a") as sums:
        sums.write(f"{'0' * 64}  ../elsewhere\n")
    assert "outside the delivery" in failed(copy)["SHA256SUMS"]


def test_no_private_key_reaches_the_delivery(signed, key):
    body = "".join(key.read_text().splitlines()[1:-1])
    for path in signed.rglob("*"):
        data = path.read_bytes()
        assert b"PRIVATE KEY" not in data, path
        assert body[:64].encode() not in data, path


# --- re-export ------------------------------------------------------------------------------


def test_a_reexport_signs_again_and_keeps_the_building_revision(tmp_path, key, disk):
    """`factory export` of a signed delivery: a new signed OVA, SHA256SUMS and its signature
    written again, and FullVersion the revision manifest.json records, not this checkout's."""
    folder = tmp_path / NAME
    folder.mkdir()
    (folder / "profile.yaml").write_text(
        GOOD + f"signing: {{key: {key}, vendor: Acme Data Services}}\n"
    )
    shutil.copy2(disk, folder / f"{NAME}.qcow2")
    git = {"revision": "feedface" * 5, "dirty": False}
    (folder / "manifest.json").write_text(json.dumps({"git": git, "artifacts": []}))
    with Progress() as progress:
        reexport(folder, ova=True, box_formats=[], progress=progress)
    assert failed(folder) == {}
    root = ET.fromstring(ova_members(folder / f"{NAME}.ova")[f"{NAME}.ovf"])
    product = root.find(f"{{{OVF1}}}VirtualSystem/{{{OVF1}}}ProductSection")
    assert product.findtext(f"{{{OVF1}}}Vendor") == "Acme Data Services"
    assert product.findtext(f"{{{OVF1}}}FullVersion") == git["revision"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {a["name"] for a in manifest["artifacts"]} == {f"{NAME}.ova", f"{NAME}.qcow2"}
    ova = (folder / f"{NAME}.ova").read_bytes()
    with pytest.raises(FactoryError, match="--ova-digest sha1: the profile signs"):
        with Progress() as progress:
            reexport(folder, ova=True, ova_digest="sha1", box_formats=[], progress=progress)
    assert (folder / f"{NAME}.ova").read_bytes() == ova


def test_the_docs_show_the_commands_the_tests_run():
    assert verification_commands("NAME") in (REPO / "docs" / "signing.md").read_text()
