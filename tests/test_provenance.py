"""Provenance of the real demo delivery: profiles/demo.yaml names a signing key, so its
SHA256SUMS and its OVA are signed; `factory verify` passes on it and names the one file that
changed in a copy; COT reads the OVA's vendor, version and the factory revision that built it."""

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from factory.delivery import full_version
from factory.signing import CERTIFICATE_FILE, SIGNATURE_FILE, certificate_path
from tests.conftest import DEMO_PROFILE, require_root, run_factory
from tests.test_export import cot_info

pytestmark = pytest.mark.e2e

NAME = "demo_hello_v1"


@pytest.fixture(scope="module", autouse=True)
def _needs_root():
    require_root()


def copy_with_one_byte_changed(delivery: Path, folder: Path) -> Path:
    """A copy of the delivery's signed parts with one byte of the OVA's disk flipped; the
    unchanged qcow2 is linked, not copied."""
    folder.mkdir()
    for name in ("SHA256SUMS", SIGNATURE_FILE, CERTIFICATE_FILE, f"{NAME}.ova"):
        shutil.copy2(delivery / name, folder / name)
    try:
        os.link(delivery / f"{NAME}.qcow2", folder / f"{NAME}.qcow2")
    except OSError:  # another file system
        shutil.copy2(delivery / f"{NAME}.qcow2", folder / f"{NAME}.qcow2")
    ova = folder / f"{NAME}.ova"
    with tarfile.open(ova) as archive:
        disk = archive.getmember(f"{NAME}-disk1.vmdk")
    with open(ova, "r+b") as handle:
        handle.seek(disk.offset_data + disk.size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    return folder


def test_the_demo_delivery_is_signed_verifiable_and_names_its_maker(
    demo_delivery, demo_signing_key, tmp_path
):
    ova = demo_delivery / f"{NAME}.ova"
    team_certificate = certificate_path(demo_signing_key)

    # Signed: a detached signature of SHA256SUMS, the public certificate, and the OVA's .cert.
    assert (demo_delivery / SIGNATURE_FILE).is_file()
    assert (demo_delivery / CERTIFICATE_FILE).read_bytes() == team_certificate.read_bytes()
    with tarfile.open(ova) as archive:
        names = archive.getnames()
        manifest = archive.extractfile(f"{NAME}.mf").read().decode()
    assert names == [f"{NAME}.ovf", f"{NAME}-disk1.vmdk", f"{NAME}.mf", f"{NAME}.cert"]
    assert all(line.startswith("SHA256(") for line in manifest.splitlines())
    key_body = "".join(demo_signing_key.read_text().splitlines()[1:-1])[:64].encode()
    for path in demo_delivery.rglob("*"):
        if path.is_file() and path.suffix not in (".ova", ".qcow2"):
            assert key_body not in path.read_bytes(), path

    # factory verify passes, with the team's certificate pinned.
    verified = run_factory("verify", str(demo_delivery), "--certificate", str(team_certificate))
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # One byte changed in a copy: verify fails and names that file only.
    copy = copy_with_one_byte_changed(demo_delivery, tmp_path / NAME)
    broken = run_factory("verify", str(copy))
    assert broken.returncode == 1, broken.stdout
    failures = [line for line in broken.stdout.splitlines() if line.startswith("FAILED")]
    assert failures and all(line.split()[1] == f"{NAME}.ova:" for line in failures), failures
    assert f"{NAME}-disk1.vmdk's sha256 differs from the manifest" in broken.stdout
    assert broken.stderr.splitlines() == [f"error: {copy}: verification failed for {NAME}.ova"]

    # COT reads who made the OVA, its version, and the revision of factory that built it.
    vendor = yaml.safe_load(DEMO_PROFILE.read_text())["signing"]["vendor"]
    revision = full_version(json.loads((demo_delivery / "manifest.json").read_text())["git"])
    info = cot_info(ova, sha256_manifest=True).stdout
    assert re.search(rf"^Vendor:\s+{re.escape(vendor)}$", info, re.MULTILINE), info
    assert re.search(rf"^Version:\s+v1\n\s+{re.escape(revision)}$", info, re.MULTILINE), info
