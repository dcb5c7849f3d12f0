"""The real chain on profiles/demo.yaml: base image, packer build, OVA, boot, paramiko checks.

One build and one validation boot are shared by all the checks here (see conftest.py)."""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from factory import export, updates
from factory.cache import sha256_file
from factory.export import virtual_hardware
from factory.profile import load_profile
from tests.conftest import (
    DEMO_PROFILE,
    REPO,
    TEST_MARK_VAR,
    demo_variant,
    forget_layer,
    require_root,
    run_factory,
    started_processes,
    wait_until,
)
from tests.image_edit import mounted_root, raw_copy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def _needs_root():
    require_root()


def interrupt_when(
    args: list[str], marker: str, sig: int, timeout: float = 900, env: dict | None = None
) -> str:
    """Start the real CLI, send `sig` once `marker` appears on its stderr, return stderr. No
    process it started (packer, QEMU, the FUSE export) may outlive it; those of other tests
    running beside it are told apart by the mark in their environment."""
    mark = uuid.uuid4().hex
    process = subprocess.Popen(
        [sys.executable, "-m", "factory", *args],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {}), TEST_MARK_VAR: mark},
    )
    seen, deadline = [], time.monotonic() + timeout
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            time.sleep(2)
            process.send_signal(sig)
            break
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never saw {marker!r}: {''.join(seen)}")
    seen.append(process.stderr.read())
    assert process.wait(timeout=180) == 130, "".join(seen)
    assert wait_until(lambda: not started_processes(mark), timeout=10), started_processes(mark)
    return "".join(seen)


def assert_lock_free(outputs: Path, name: str) -> None:
    with open(outputs / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def assert_host_install_released(outputs: Path) -> None:
    """Nothing of an interrupted host layer is left: no mount or loop device under `outputs`,
    no installer left in its chroot (interrupt_when checks the FUSE export)."""
    assert str(outputs) not in Path("/proc/self/mounts").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(outputs) not in loops
    assert started_processes(None, chrooted_under=outputs) == []


def interrupt_demo_build(
    outputs: Path, marker: str, sig: int, profile: Path = DEMO_PROFILE
) -> None:
    """Interrupt a demo build at `marker`; it must say so and publish nothing."""
    require_root()
    stderr = interrupt_when(["build", str(profile), "--outputs", str(outputs)], marker, sig)
    assert "interrupted; nothing was published" in stderr
    time.sleep(2)
    assert not (outputs / "demo_hello_v1").exists()
    assert not list(outputs.glob(".staging-*"))
    assert_lock_free(outputs, "demo_hello_v1")


def test_interrupt_mid_packer_build_leaves_nothing(demo_channel, tmp_path):
    """Ctrl-C while packer boots the VM: no QEMU, no delivery, no staging, no lock. The
    profile opens one more port, never used before, so no stored system layer spares the boot.
    Its outputs folder is its own: other tests may have published the demo already."""

    def fresh_port(profile: dict) -> None:
        security = profile.setdefault("security", {})
        security["open_ports"] = [20000 + uuid.uuid4().int % 10000]

    variant = demo_variant(tmp_path, fresh_port)
    seeds_before = set(Path(tempfile.gettempdir()).glob("packer_to_cdrom*"))
    interrupt_demo_build(tmp_path / "out", "booting the base image", signal.SIGINT, variant)
    # Packer writes the build VM's seed into its own temporary folder: the build's, removed.
    assert set(Path(tempfile.gettempdir()).glob("packer_to_cdrom*")) <= seeds_before


def test_interrupt_during_the_host_install_leaves_no_mount(demo_channel, tmp_path):
    """SIGTERM while an environment installs into its layer on the host: the chroot's
    processes stop, the layer's FUSE export, file systems and loop device are released, and
    nothing is kept. The profile asks for a disk one GiB larger than the demo's, so its conda
    and environment layers are its own: the demo's stored layers, which later tests build on,
    are left alone."""

    def larger_disk(profile: dict) -> None:
        profile["resources"]["disk"] += 1

    variant = demo_variant(tmp_path, larger_disk)
    outputs = tmp_path / "out"
    forget_layer(variant, "conda", outputs)  # stored by an earlier session
    interrupt_demo_build(outputs, "installing the environment", signal.SIGTERM, variant)
    assert_host_install_released(outputs)


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
        "notebooks",
        "HANDOVER.md",
        "grafana-dashboard.json",
    }
    assert expected <= names, names
    assert not list(demo_delivery.parent.glob(".staging-*"))
    assert not (demo_delivery / "build" / "payload" / "tls").exists()
    delivered = yaml.safe_load((demo_delivery / "profile.yaml").read_text())
    assert "extends" not in delivered and delivered["security"]["audit_retention_days"] == 2555
    assert "cat jupyter-token" in (demo_delivery / "HANDOVER.md").read_text()
    dashboard = json.loads((demo_delivery / "grafana-dashboard.json").read_text())
    assert all("node_" in panel["targets"][0]["expr"] for panel in dashboard["panels"])


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


def test_no_secret_in_delivery_logs_or_process_list(demo_delivery, build_secrets, tmp_path):
    """Search everything the build produced, and the process list, for the build's key."""
    assert build_secrets.private_keys, "the build's ephemeral key was never seen"
    # The first armoured lines of an OpenSSH key are a fixed header and the public key; the
    # later lines hold the private material, unique to this build.
    bodies = {
        line.encode()
        for key in build_secrets.private_keys
        for line in key.splitlines()[3:-1]
        if len(line) >= 40
    }
    assert bodies
    for path in demo_delivery.rglob("*"):
        if path.is_file() and path.suffix not in (".ova", ".qcow2"):
            data = path.read_bytes()
            assert b"PRIVATE KEY" not in data, path
            assert not re.search(rb"JUPYTER_TOKEN=[0-9a-f]{16}", data), path
            assert not any(body in data.replace(b"\n", b"") for body in bodies), path
    for line in build_secrets.command_lines:
        assert "PRIVATE KEY" not in line
        assert "build_ssh_key_file=" not in line
    raw = tmp_path / "image.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(demo_delivery / "demo_hello_v1.qcow2"), str(raw)],
        check=True,
    )
    # The generic "BEGIN OPENSSH PRIVATE KEY" marker is in ssh-keygen itself, so search for
    # this build's own key material.
    patterns = [arg for body in sorted(bodies) for arg in ("-e", body.decode())]
    found = subprocess.run(
        ["grep", "-c", "-a", "-F", *patterns, str(raw)], capture_output=True, text=True
    )
    assert found.stdout.strip() == "0", "the build's private key is inside the image"
    raw.unlink()


def test_interrupt_mid_export_keeps_the_delivered_ova(demo_delivery):
    ova = demo_delivery / "demo_hello_v1.ova"
    digest, files = sha256_file(ova), sorted(p.name for p in demo_delivery.iterdir())
    stderr = interrupt_when(["export", str(demo_delivery)], "streamOptimized", signal.SIGTERM)
    assert "interrupted" in stderr
    assert sha256_file(ova) == digest
    assert sorted(p.name for p in demo_delivery.iterdir()) == files
    assert_lock_free(demo_delivery.parent, "demo_hello_v1")


def test_reexport_keeps_the_demo_signed_and_passes_cot(demo_delivery):
    """The demo signs (signing.key), so its OVA is written again signed, with the SHA256
    manifest a signature needs; a SHA1 one is refused before anything is written."""
    from tests.test_export import cot_info

    refused = run_factory("export", str(demo_delivery), "--ova-digest", "sha1")
    assert refused.returncode == 1 and "--ova-digest sha1: the profile signs" in refused.stderr
    result = run_factory("export", str(demo_delivery))
    assert result.returncode == 0, result.stderr
    subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=demo_delivery, check=True)
    verified = run_factory("verify", str(demo_delivery))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    cot_info(demo_delivery / "demo_hello_v1.ova", sha256_manifest=True)


def test_interrupt_mid_validation_leaves_no_vm(demo_delivery, tmp_path):
    scratch, reports = tmp_path / "tmp", tmp_path / "reports"
    scratch.mkdir()
    stderr = interrupt_when(
        ["validate", str(demo_delivery), "--report-dir", str(reports)],
        "booting",
        signal.SIGTERM,
        env={"TMPDIR": str(scratch)},
    )
    assert "interrupted" in stderr
    assert list(scratch.iterdir()) == []
    assert not reports.exists() or list(reports.iterdir()) == []


def test_demo_validates(demo_validation, demo_delivery):
    assert demo_validation.returncode == 0, demo_validation.stdout + demo_validation.stderr
    assert "validated: all" in demo_validation.stdout
    report = json.loads((demo_delivery / "report.json").read_text())
    names = {c["name"] for c in report["checks"] if c["status"] == "passed"}
    for expected in (
        "cpu: the VM runs at x86-64-v2 (QEMU model Nehalem)",
        "demo: python 3.11",
        "demo: imports tabulate",
        "demo: conda package six",
        "jupyter: service active",
        "demo: matches its lock",
        "jupyter: matches its lock",
        "sbom: lists every package in the image, and nothing else",
        "ssh: root login with an authorised key is refused",
        "hygiene: no build credentials left",
        "offline: the guest has no network egress",
        "offline: .condarc and pip.conf point only at the image",
        "offline: a new environment is created from the baked channel",
        "offline: pip installs tabulate from the wheelhouse",
        "cloud-init: finished without errors",
        "importer: the root file system grows to fill a larger disk",
        "ssh: sshd denies root login",
        "ssh: password login is refused",
        "https: valid certificate chain for the machine's name",
        "https: a request without the token is refused",
        "https: the first-boot token opens Jupyter",
        "https: websockets pass through nginx",
        "https: plain HTTP redirects to HTTPS",
        "jupyter: each environment is a kernel",
        "notebooks: demo-credit-score.ipynb runs headless",
        "firewall: inbound dropped except the profile's ports",
        "firewall: only the listed ports listen",
        "firewall: port 7777 (not listed) is unreachable from outside",
        "services: run unprivileged",
        "monitoring: node exporter metrics are scraped",
        "audit: auditd is active with the login, sudo and token rules",
        "audit: sudo is recorded",
        "audit: logins are kept in the persistent journal",
        "audit: logs are kept 2555 days",
        "audit: Jupyter access is logged",
        "updates: automatic security updates are off",
        "hygiene: no private key, token or password from the build",
        "score: answers /health through nginx over TLS",
        "score: runs as its own user svc-score",
        "score: port 8601 reachable only through nginx",
        "score: secrets made on this machine's first boot",
        "score: restarts on failure",
        "snapshots: factory-snapshot.timer is on",
        "snapshots: a snapshot holds every environment",
    ):
        assert expected in names, expected
    rollback = [n for n in names if n.startswith("snapshots: demo broken, then rolled back to ")]
    assert len(rollback) == 1, names
    # Booted without a seed, as an importer boots it: cloud-init found no datasource and stayed off.
    details = {c["name"]: c["detail"] for c in report["checks"]}
    assert "no seed disk" in details["cloud-init: finished without errors"]
    for report_file in ("report.xml", "report.html"):
        assert (demo_delivery / report_file).stat().st_size > 0
    cpu = report["subject"]["cpu"]
    assert (cpu["model"], cpu["booted_level"], cpu["cpu_baseline"]) == (
        "Nehalem",
        "x86-64-v2",
        "x86-64-v2",
    )
    # Under TCG, with AMD's vendor id: the guest kernel runs without page-table isolation.
    assert cpu["vendor_id"] == ("AuthenticAMD" if cpu["accelerator"] == "tcg" else None)
    assert details["cpu: the VM runs at x86-64-v2 (QEMU model Nehalem)"].endswith(
        "; vendor id AuthenticAMD" if cpu["accelerator"] == "tcg" else "CPU flags"
    )


def test_validator_fails_exactly_the_broken_promises(demo_validation, demo_delivery, tmp_path):
    """Seven broken promises: an image with root login switched back on, whose cloud-init runs
    without a seed (one datasource) and creates its default account, whose client service is not
    started, and whose dpkg database holds one package older than its security index with no
    security suite in its sources; a profile that
    promises a package and an NVIDIA driver the image lacks, and a lock that names a version
    the image does not hold. Within the groups they touch, exactly the checks of those fail,
    and GPU level 2 is reported as skipped (no GPU), never as passed."""
    assert demo_validation.returncode == 0
    copy = tmp_path / "demo_hello_v1"
    copy.mkdir()
    for name in ("locks", "notebooks", "services"):
        shutil.copytree(demo_delivery / name, copy / name)
    shutil.copy2(demo_delivery / updates.INDEX_FILE, copy / updates.INDEX_FILE)
    index = updates.SecurityIndex.from_json(json.loads((copy / updates.INDEX_FILE).read_text()))
    raw = raw_copy(demo_delivery / "demo_hello_v1.qcow2", tmp_path / "disk.raw")
    with mounted_root(raw) as root:
        config = next((root / "etc/ssh/sshd_config.d").glob("*-factory.conf"))
        config.write_text(config.read_text().replace("PermitRootLogin no", "PermitRootLogin yes"))
        cloud = root / "etc/cloud/cloud.cfg.d"
        (cloud / "90-factory-datasource.cfg").write_text("datasource_list: [ NoCloud, None ]\n")
        (cloud / "91-factory-no-default-user.cfg").unlink()
        (root / "etc/systemd/system/multi-user.target.wants/factory-service-score.service").unlink()
        unpatched = unpatch_one_package(root, index)
    export.export_ova(raw, virtual_hardware(load_profile(demo_delivery / "profile.yaml")), copy)
    raw.unlink()
    lock_path = copy / "locks" / "demo.lock.json"
    lock = json.loads(lock_path.read_text())
    for package in lock["conda"]:
        if package["name"] == "six":
            package["version"] = "0.0.1"
    lock_path.write_text(json.dumps(lock))
    profile = yaml.safe_load((demo_delivery / "profile.yaml").read_text())
    profile["environments"][0]["pip"].append("requests")
    profile["gpu"] = {"vendor": "nvidia", "driver": "535", "cuda": "12.2"}  # no driver inside
    (copy / "profile.yaml").write_text(yaml.safe_dump(profile))
    report_dir = tmp_path / "reports"
    # The groups the broken promises touch; every other group passed on the unmodified image
    # (test_demo_validates), and skipping them keeps this second boot short. https and audit
    # ride along: asked for without the jupyter group, they wait for Jupyter and make their
    # own requests.
    only = "importer,cpu,env,lock,ssh,https,audit,updates,credentials,client-services,gpu"
    result = run_factory("validate", str(copy), "--report-dir", str(report_dir), "--only", only)
    assert result.returncode == 5  # validation failed
    assert "demo: imports requests" in result.stderr
    report = json.loads((report_dir / "report.json").read_text())
    failed = sorted(c["name"] for c in report["checks"] if c["status"] == "failed")
    assert failed == [
        "demo: imports requests",
        "demo: matches its lock",
        "gpu: driver 535 is installed",
        "gpu: kernel module built for the booted kernel",
        "gpu: nvidia-smi is present",
        "importer: no account beyond the profile's",
        "score: answers /health through nginx over TLS",
        "score: port 8601 reachable only through nginx",
        "score: runs as its own user svc-score",
        "score: secrets made on this machine's first boot",
        "ssh: root login with an authorised key is refused",
        "ssh: sshd denies root login",
        f"updates: every security update of {index.suite} ({index.date}) is installed",
    ], failed
    details = {c["name"]: c["detail"] for c in report["checks"]}
    assert "unexpected: debian" in details["importer: no account beyond the profile's"]
    assert "HTTP 200" in details["https: the first-boot token opens Jupyter"]
    assert "API request(s)" in details["audit: Jupyter access is logged"]
    assert unpatched in details[failed[-1]]
    level2 = next(c for c in report["checks"] if c["name"] == "gpu: nvidia-smi lists the device")
    assert (level2["status"], level2["detail"]) == ("skipped", "skipped: no GPU on this machine")
    detail = next(c["detail"] for c in report["checks"] if c["name"] == "demo: matches its lock")
    assert "six 1.17.0 (lock 0.0.1)" in detail


def unpatch_one_package(root: Path, index: updates.SecurityIndex) -> str:
    """Make the image look built without its security suite: drop the suite from its apt
    sources, and record in dpkg's database an installed package of the index at an older
    version. Returns the line the updates check must report."""
    sources = root / "etc/apt/sources.list"
    sources.write_text(
        "".join(line for line in sources.read_text().splitlines(True) if "-security" not in line)
    )
    status = root / "var/lib/dpkg/status"
    stanzas = status.read_text().split("\n\n")
    for number, stanza in enumerate(stanzas):
        name = re.search(r"^Package: (\S+)$", stanza, re.M)
        version = re.search(r"^Version: (\S+)$", stanza, re.M)
        if name and version and index.packages.get(name.group(1)) == version.group(1):
            older = f"{version.group(1)}~unpatched"
            stanzas[number] = stanza.replace(f"Version: {version.group(1)}", f"Version: {older}")
            status.write_text("\n\n".join(stanzas))
            return f"{name.group(1)} {older} < {version.group(1)}"
    raise AssertionError("no installed package is at its security index's version")


def test_exported_environments_match_the_lock(demo_validation, demo_delivery):
    assert demo_validation.returncode == 0
    installed = json.loads((demo_delivery / "envs" / "demo.installed.json").read_text())
    lock = json.loads((demo_delivery / "locks" / "demo.lock.json").read_text())
    for package in lock["conda"]:
        assert installed["conda"][package["name"]] == package["version"]
    assert "tabulate==" in (demo_delivery / "envs" / "demo.pip-freeze.txt").read_text()
