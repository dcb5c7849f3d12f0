"""The container image of the demo delivery, through the real umoci, skopeo and podman.

`factory export --format oci` runs once on a copy of the demo delivery (hard links: every
write of the export is a new file renamed into place, so the shared delivery is never touched).
The archives are then loaded and run with podman, and `factory validate --container` checks
the image. Every container and image a test makes is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from factory.cache import sha256_file
from factory.validate.container import podman_base, rlimit_options
from tests.conftest import run_factory

pytestmark = pytest.mark.e2e

NAME = "demo_hello_v1"
REFERENCE = "localhost/demo_hello:1"
TOKEN_FILE = "/etc/factory/jupyter.env"


def _require_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (the export mounts the delivered disk)")
    absent = [t for t in ("umoci", "skopeo", "podman", "runc") if shutil.which(t) is None]
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed; apt-get install -y {' '.join(absent)}")


def _podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*podman_base(), *args], capture_output=True, text=True, check=check)


def _linked_copy(delivery: Path, folder: Path) -> Path:
    copy = folder / delivery.name
    shutil.copytree(delivery, copy, copy_function=os.link)
    return copy


@pytest.fixture(scope="module")
def oci_delivery(demo_delivery: Path, tmp_path_factory) -> Path:
    _require_tools()
    copy = _linked_copy(demo_delivery, tmp_path_factory.mktemp("oci"))
    exported = run_factory("export", str(copy), "--format", "oci")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    return copy


@pytest.fixture(scope="module")
def loaded_image(oci_delivery: Path):
    """The docker archive loaded into podman under its reference; removed afterwards."""
    loaded = _podman("load", "--input", str(oci_delivery / f"{NAME}.docker.tar"))
    assert REFERENCE in loaded.stdout
    yield REFERENCE
    _podman("rmi", "--force", REFERENCE, check=False)


def test_export_lists_both_archives_in_signed_sha256sums(oci_delivery: Path):
    sums = dict(
        reversed(line.split("  ", 1))
        for line in (oci_delivery / "SHA256SUMS").read_text().splitlines()
    )
    for name in (f"{NAME}.oci.tar", f"{NAME}.docker.tar"):
        assert sums[name] == sha256_file(oci_delivery / name)
    assert not list(oci_delivery.glob(".scratch-*")), "the export left its scratch folder"
    verified = run_factory("verify", str(oci_delivery))  # the signature covers the new lines
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{NAME}.oci.tar: sha256 matches SHA256SUMS" in verified.stdout


def test_image_config_runs_jupyter_unprivileged_without_a_token(loaded_image: str):
    config = json.loads(_podman("image", "inspect", loaded_image).stdout)[0]["Config"]
    assert config["User"] == "jupyter"
    assert "8888/tcp" in config["ExposedPorts"]
    assert not [e for e in config.get("Env", []) if e.startswith("JUPYTER_TOKEN")]
    assert config["Labels"]["org.opencontainers.image.title"] == NAME
    assert config["Labels"]["org.opencontainers.image.version"] == "1"
    assert config["Labels"]["org.opencontainers.image.description"].startswith("factory demo")
    # The image's own token file is empty, and it holds no kernel or bootloader.
    look = _podman(
        "run", "--rm", "--user", "root", *rlimit_options(), loaded_image, "sh", "-c",
        f"wc -c < {TOKEN_FILE}; find /boot /usr/lib/modules -mindepth 1 | wc -l",
    )  # fmt: skip
    assert look.stdout.split() == ["0", "0"]


def test_two_containers_make_different_tokens_and_run_jupyter_as_jupyter(loaded_image: str):
    names = [f"factory-test-oci-{os.getpid()}-{n}" for n in (1, 2)]
    try:
        for name in names:
            _podman("run", "--detach", "--name", name, *rlimit_options(),
                    "--publish", "127.0.0.1::8888", loaded_image)  # fmt: skip
        tokens = []
        for name in names:
            started = subprocess.run(
                [*podman_base(), "exec", "--user", "root", name, "sh", "-c",
                 f"for i in $(seq 60); do [ -s {TOKEN_FILE} ] && break; sleep 1; done; "
                 f"cat {TOKEN_FILE}; ps -o user= -p 1"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            token_line, user = started.stdout.split()
            assert token_line.startswith("JUPYTER_TOKEN=") and len(token_line) > 40
            assert user == "jupyter"
            tokens.append(token_line)
        assert tokens[0] != tokens[1]
        # The exposed port is published on the host.
        port = _podman("port", names[0], "8888").stdout.strip()
        assert port.startswith("127.0.0.1:")
    finally:
        for name in names:
            _podman("rm", "--force", name, check=False)


def test_validate_container_passes_env_lock_kernel_and_notebook_checks(oci_delivery: Path):
    validated = run_factory("validate", str(oci_delivery), "--container")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    report = json.loads((oci_delivery / "container-validation" / "report.json").read_text())
    by_group: dict[str, set[str]] = {}
    for check in report["checks"]:
        by_group.setdefault(check["group"], set()).add(check["status"])
    for group in ("env:demo", "env:jupyter", "jupyter", "notebooks"):
        assert by_group.get(group) == {"passed"}, (group, by_group)
    passed = {c["name"] for c in report["checks"] if c["status"] == "passed"}
    assert {"demo: matches its lock", "jupyter: matches its lock"} <= passed
    assert "notebooks: demo-credit-score.ipynb runs headless" in passed
    for group in ("ssh", "firewall", "services", "https"):
        assert by_group.get(group) == {"skipped"}, group
    assert "SKIPPED  ssh: not checked in a container: a container has no sshd" in validated.stdout
    # The VM's own reports (which `factory verify --profile` reads) are left alone.
    assert not (oci_delivery / "report.json").exists() or "oci" not in json.loads(
        (oci_delivery / "report.json").read_text()
    ).get("subject", {})
    leftovers = _podman("ps", "--all", "--filter", "name=factory-validate-", "--quiet").stdout
    assert not leftovers.strip()


def test_validate_container_without_an_image_says_to_export(demo_delivery: Path):
    _require_tools()
    refused = run_factory("validate", str(demo_delivery), "--container")
    assert refused.returncode == 2
    assert f"no {NAME}.oci.tar; run `factory export" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_failed_export_leaves_no_partial_file(demo_delivery: Path, tmp_path: Path):
    _require_tools()
    copy = _linked_copy(demo_delivery, tmp_path)
    sums = (copy / "SHA256SUMS").read_text()
    fake = tmp_path / "bin"
    fake.mkdir()
    # skopeo writes the archives: make it fail after writing part of one.
    (fake / "skopeo").write_text(
        "#!/bin/sh\nfor a; do last=$a; done\nf=${last#*-archive:}; f=${f%%:*}\n"
        'head -c 1000 /dev/zero > "$f"; echo "skopeo: disk on fire" >&2; exit 1\n'
    )
    (fake / "skopeo").chmod(0o755)
    failed = run_factory(
        "export", str(copy), "--format", "oci", env={"PATH": f"{fake}:{os.environ['PATH']}"}
    )
    assert failed.returncode == 4, failed.stdout + failed.stderr
    assert "skopeo failed" in failed.stderr and "Traceback" not in failed.stderr
    assert not list(copy.glob("*.tar")) and not list(copy.glob(".scratch-*"))
    assert (copy / "SHA256SUMS").read_text() == sums
