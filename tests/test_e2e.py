"""The real chain on profiles/demo.yaml: base image, packer build, OVA, boot, paramiko checks.

One build and one validation boot are shared by all the checks here (see conftest.py)."""

import json
import subprocess
import tarfile

import pytest

from tests.conftest import DEMO_PROFILE, require_root, run_factory

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def _needs_root():
    require_root()


def test_delivery_holds_every_artifact(demo_delivery):
    names = {p.name for p in demo_delivery.iterdir()}
    expected = {
        "demo_hello_v1.ova",
        "demo_hello_v1.qcow2",
        "SHA256SUMS",
        "manifest.json",
        "build.log",
        "profile.yaml",
        "locks",
        "build",
    }
    assert expected <= names, names
    assert not list(demo_delivery.parent.glob(".staging-*"))


def test_checksums_and_manifest(demo_delivery):
    subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=demo_delivery, check=True)
    manifest = json.loads((demo_delivery / "manifest.json").read_text())
    assert {a["name"] for a in manifest["artifacts"]} == {
        "demo_hello_v1.ova",
        "demo_hello_v1.qcow2",
    }
    assert manifest["tool_versions"]["packer"].startswith("1.")
    assert manifest["profile_sha256"]


def test_ova_is_ustar_with_ovf_first(demo_delivery):
    with tarfile.open(demo_delivery / "demo_hello_v1.ova") as ova:
        names = ova.getnames()
    assert names[0].endswith(".ovf") and names[1].endswith(".vmdk") and names[2].endswith(".mf")
    header = (demo_delivery / "demo_hello_v1.ova").read_bytes()[257:265]
    assert header == b"ustar\x0000"


def test_no_secret_in_delivery(demo_delivery):
    for path in demo_delivery.rglob("*"):
        if path.is_file() and path.suffix not in (".ova", ".qcow2"):
            text = path.read_text(errors="replace")
            assert "PRIVATE KEY" not in text, path
            assert "JUPYTER_TOKEN=" not in text, path


def test_demo_validates(demo_validation, demo_delivery):
    assert demo_validation.returncode == 0, demo_validation.stdout + demo_validation.stderr
    assert "validated: all" in demo_validation.stdout
    report = json.loads((demo_delivery / "report.json").read_text())
    names = {c["name"] for c in report["checks"] if c["status"] == "passed"}
    for expected in (
        "demo: python 3.11",
        "demo: imports tabulate",
        "demo: conda package six",
        "jupyter: service active",
        "ssh: root login with an authorised key is refused",
        "hygiene: no build credentials left",
        "cloud-init: finished without errors",
    ):
        assert expected in names, expected
    for report_file in ("report.xml", "report.html"):
        assert (demo_delivery / report_file).stat().st_size > 0


def test_validator_fails_exactly_the_missing_package(demo_validation, demo_delivery, tmp_path):
    """A profile that promises a package the image lacks fails that check, and only that one."""
    assert demo_validation.returncode == 0
    promised = tmp_path / "demo-plus-requests.yaml"
    promised.write_text(
        DEMO_PROFILE.read_text().replace("pip: [tabulate]", "pip: [tabulate, requests]")
    )
    report_dir = tmp_path / "reports"
    result = run_factory(
        "validate", str(demo_delivery), "--profile", str(promised), "--report-dir", str(report_dir)
    )
    assert result.returncode == 1
    assert "demo: imports requests" in result.stderr
    report = json.loads((report_dir / "report.json").read_text())
    failed = [c["name"] for c in report["checks"] if c["status"] == "failed"]
    assert failed == ["demo: imports requests"]
