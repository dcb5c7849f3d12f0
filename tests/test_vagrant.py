"""Tester boxes through the real Vagrant and libvirt, on the shared demo build.

`factory export` writes the boxes and their catalog. The tester guide's commands (docs/vagrant.md)
then run verbatim: `vagrant box add` from the catalog, `vagrant up --provider=libvirt`, Jupyter
through the forwarded port and the sample notebook. The validator's environment check runs
inside the box over `vagrant ssh -c`. The guide's clean-up runs last, and the last test checks
that it left no machine, volume, box or QEMU behind. One `vagrant up` serves every check.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from factory.cache import cache_dir, sha256_file
from factory.cpu import guest_level_problem, validation_cpu
from factory.profile import load_profile
from factory.validate.context import PASSED, CheckContext
from factory.validate.env import check_environment
from factory.validate.target import CommandResult
from tests.conftest import REPO, run_factory

pytestmark = pytest.mark.e2e

GUIDE = REPO / "docs" / "vagrant.md"
CLEAN_UP = "Clean up"
BOX = "demo/hello"
COMMAND_TIMEOUT = 1800  # vagrant up without KVM, beside another VM: minutes, not seconds


def guide_commands(text: str) -> list[tuple[str, str]]:
    """(section, command) for every line of the guide's ```sh blocks, in order."""
    commands, section, in_block = [], "", False
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.strip() == "```sh":
            in_block = True
        elif line.strip() == "```":
            in_block = False
        elif in_block and line.strip():
            commands.append((section, line.strip()))
    return commands


def virsh(*args: str) -> str:
    result = subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60
    )
    return result.stdout if result.returncode == 0 else ""


def domain_qemu_pids(domain: str) -> set[int]:
    """QEMU processes libvirt runs for this domain (other VMs on the host are not ours)."""
    result = subprocess.run(
        ["pgrep", "-f", f"qemu-system-x86_64 .*guest={domain},"], capture_output=True, text=True
    )
    return {int(pid) for pid in result.stdout.split()}


def box_volumes() -> list[str]:
    prefix = BOX.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_"
    return [
        line.split()[0]
        for line in virsh("vol-list", "default").splitlines()[2:]
        if line.split() and line.split()[0].startswith(prefix)
    ]


@contextlib.contextmanager
def libvirt_running():
    """libvirtd, virtlogd and the default network, started here when nothing else did (no
    systemd in CI); what was started here is stopped again."""

    def pids(daemon: str) -> list[int]:
        found = subprocess.run(["pgrep", "-x", daemon], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    started = []
    for daemon in ("virtlogd", "libvirtd"):
        if not pids(daemon):
            subprocess.run([daemon, "-d"], check=True)  # forks; the child is the daemon
            deadline = time.monotonic() + 10
            while not pids(daemon) and time.monotonic() < deadline:
                time.sleep(0.2)
            started += pids(daemon)
    deadline = time.monotonic() + 30
    while not virsh("version") and time.monotonic() < deadline:
        time.sleep(1)
    network_started = not re.search(r"^Active:\s+yes", virsh("net-info", "default"), re.M)
    if network_started:
        subprocess.run(["virsh", "-c", "qemu:///system", "net-start", "default"], check=False)
    try:
        yield
    finally:
        if network_started:
            virsh("net-destroy", "default")
        for pid in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


@dataclass
class Shell:
    """A tester's shell: the vagrant/ folder, the environment the guide asks for, a log."""

    workdir: Path
    env: dict
    log: Path
    outputs: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cleaned: bool = False

    @property
    def domain(self) -> str:
        """The libvirt domain `vagrant up` makes from this folder."""
        return f"{self.workdir.name}_default"

    def sh(self, command: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=self.workdir,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        self.seconds[command] = time.monotonic() - started
        with open(self.log, "a") as log:
            log.write(f"$ {command}  # exit {result.returncode}, {self.seconds[command]:.0f} s\n")
            log.write(result.stdout[-4000:] + result.stderr[-4000:] + "\n")
        self.outputs[command] = result
        return result


class VagrantTarget:
    """The validator's target interface over `vagrant ssh -c`, so its checks run in the box."""

    def __init__(self, tester: Shell) -> None:
        self.tester = tester

    def run(self, command: str, stdin: str | None = None, timeout: float = 600) -> CommandResult:
        from factory.escape import shell_word

        result = self.tester.sh(f"vagrant ssh -c {shell_word(command)}", stdin=stdin)
        return CommandResult(result.returncode, result.stdout, result.stderr)


def _require_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (libvirt's system instance)")
    missing = [t for t in ("vagrant", "virsh", "libvirtd", "virtlogd") if not shutil.which(t)]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: run `make setup`")


@pytest.fixture(scope="module")
def boxes(demo_delivery: Path, tmp_path_factory) -> Path:
    """`factory export` of the demo delivery's boxes; returns the folder with the catalog."""
    _require_tools()
    root = tmp_path_factory.mktemp("boxes")
    run_factory(
        "export",
        str(demo_delivery),
        "--format",
        "vagrant-libvirt,vagrant-virtualbox",
        "--boxes",
        str(root),
        check=True,
    )
    return root / "demo_hello"


@pytest.fixture(scope="module")
def tester(boxes: Path, tmp_path_factory):
    """Runs the guide up to its clean-up; the clean-up runs in the last test (and here, if
    that test did not run)."""
    from factory import kvm

    workdir = tmp_path_factory.mktemp("tester") / "vagrant"
    shutil.copytree(REPO / "vagrant", workdir)
    driver = "kvm" if kvm.choose_accelerator("auto") == "kvm" else "qemu"
    env = {
        **os.environ,
        "VAGRANT_HOME": str(tmp_path_factory.mktemp("vagrant-home")),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "FACTORY_BOX_URL": (boxes / "demo_hello.json").as_uri(),
        "FACTORY_BOX": BOX,
        "FACTORY_LIBVIRT_DRIVER": driver,
    }
    log = workdir.parent / "tester.log"
    session = Shell(workdir, env, log)
    steps = guide_commands(GUIDE.read_text())
    with libvirt_running():
        assert not box_volumes(), f"stale libvirt volumes of {BOX}: {box_volumes()}"
        try:
            for section, command in steps:
                if section == CLEAN_UP:
                    continue
                if session.sh(command).returncode != 0:
                    break  # later steps depend on this one; the tests report which failed
            for command, seconds in session.seconds.items():
                print(f"tester: {seconds:6.0f} s  {command}", file=sys.stderr)
            yield session, steps
        finally:
            if not session.cleaned:
                for section, command in steps:
                    if section == CLEAN_UP:
                        session.sh(command)


def _output(session: Shell, pattern: str) -> subprocess.CompletedProcess:
    (command,) = [c for c in session.outputs if re.search(pattern, c)]
    return session.outputs[command]


def test_guide_names_the_steps_a_tester_takes():
    commands = [c for _s, c in guide_commands(GUIDE.read_text())]
    for needed in ("vagrant box add", "vagrant up", "vagrant ssh", "nbconvert", "vagrant destroy"):
        assert any(needed in c for c in commands), f"the guide never runs {needed!r}"


def test_catalog_lists_each_box_with_its_checksum(boxes):
    catalog = json.loads((boxes / "demo_hello.json").read_text())
    assert catalog["name"] == BOX
    (version,) = catalog["versions"]
    assert version["version"] == "1"
    providers = {p["name"]: p for p in version["providers"]}
    assert set(providers) == {"libvirt", "virtualbox"}
    for provider in providers.values():
        box = Path(provider["url"].removeprefix("file://"))
        assert box.parent == boxes
        assert provider["checksum_type"] == "sha256"
        assert provider["checksum"] == sha256_file(box)


def test_libvirt_box_carries_the_delivered_disk_unchanged(boxes, demo_delivery, tmp_path):
    with tarfile.open(boxes / "demo_hello_v1-libvirt.box") as box:
        assert sorted(box.getnames()) == ["Vagrantfile", "box.img", "metadata.json", "seed.img"]
        box.extractall(tmp_path, filter="data")
    assert sha256_file(tmp_path / "box.img") == sha256_file(demo_delivery / "demo_hello_v1.qcow2")
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["provider"] == "libvirt"
    assert [d["path"] for d in metadata["disks"]] == ["box.img", "seed.img"]
    # The insecure key is in the tester seed only: the delivered disk never holds it.
    assert b"vagrant insecure public key" in (tmp_path / "seed.img").read_bytes()
    vagrantfile = (tmp_path / "Vagrantfile").read_text()
    assert 'synced_folder ".", "/vagrant", disabled: true' in vagrantfile
    assert "lv.cpus = 2" in vagrantfile and "lv.memory = 2048" in vagrantfile
    assert "guest: 8888" in vagrantfile


def test_vagrant_up_and_every_guide_step_succeed(tester):
    session, steps = tester
    for section, command in steps:
        if section == CLEAN_UP:
            continue
        result = session.outputs.get(command)
        assert result is not None, f"never ran (an earlier step failed): {command}"
        assert result.returncode == 0, (
            f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}\nfull log: {session.log}"
        )


def test_box_runs_at_the_profiles_cpu_level(tester, demo_delivery):
    """The box boots at the profile's cpu_baseline, as validate and deploy boot the delivery,
    not at the tester's CPU: without KVM, Nehalem with AMD's vendor id (libvirt's host-model
    gave an EPYC, x86-64-v3 with AVX2)."""
    session, _steps = tester
    baseline = load_profile(demo_delivery / "profile.yaml").profile.cpu_baseline
    driver = session.env["FACTORY_LIBVIRT_DRIVER"]
    expected = validation_cpu(baseline, "kvm" if driver == "kvm" else "tcg")
    (pid,) = domain_qemu_pids(session.domain)
    words = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    cpu_options = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-cpu"]
    assert cpu_options and cpu_options[-1] == expected.qemu_cpu, cpu_options  # QEMU's choice
    seen = session.sh("vagrant ssh -c 'grep -m2 -E \"^(vendor_id|flags)\" /proc/cpuinfo'")
    assert seen.returncode == 0, seen.stderr[-2000:]
    fields = {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in seen.stdout.splitlines())
    }
    flags = set(fields["flags"].split())
    assert guest_level_problem(flags, expected.level, exact=True) is None, sorted(flags)
    if expected.vendor_id:  # under KVM the guest sees the host's own vendor
        assert fields["vendor_id"] == expected.vendor_id, fields


def test_jupyter_answers_on_the_forwarded_port(tester):
    session, _steps = tester
    result = _output(session, r"^curl .*127\.0\.0\.1:8888/api")
    assert result.returncode == 0, result.stderr
    assert "version" in json.loads(result.stdout)


def test_sample_notebook_ran_every_environment(tester, demo_delivery):
    session, _steps = tester
    result = _output(session, r"grep -Eo")
    assert result.returncode == 0, result.stderr
    loaded = load_profile(demo_delivery / "profile.yaml")
    for env in loaded.profile.environments:
        line = rf"environment {env.name}: python [0-9.]+, \d+ packages: ok"
        assert re.search(line, result.stdout), result.stdout


def test_validator_environment_check_passes_inside_the_box(tester, demo_delivery):
    session, _steps = tester
    loaded = load_profile(demo_delivery / "profile.yaml")
    ctx = CheckContext(target=VagrantTarget(session), loaded=loaded, throwaway_vm=True)
    results = [r for env in loaded.profile.environments for r in check_environment(ctx, env)]
    assert results
    failed = [f"{r.name}: {r.detail}" for r in results if r.status != PASSED]
    assert not failed, failed
    # The same check, pointed at an environment the image does not have, fails.
    absent = loaded.profile.environments[0].model_copy(update={"name": "absent"})
    assert [r.status for r in check_environment(ctx, absent)] == ["failed"]


def test_live_host_reports_drift_since_the_delivery(tester, demo_delivery, tmp_path):
    """On the running box, one Debian package is added and one port opened; `factory validate
    --host ... DELIVERY` reports both against the delivery's SBOM and profile, and the SBOM's
    other packages as unchanged."""
    session, _steps = tester
    config = dict(
        line.strip().split(" ", 1)
        for line in session.sh("vagrant ssh-config").stdout.splitlines()
        if line.strip() and " " in line.strip()
    )
    package = tmp_path / "factory-drift-probe"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: factory-drift-probe\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: factory tests <tests@factory.invalid>\nDescription: drift probe\n"
    )
    subprocess.run(["dpkg-deb", "--build", str(package), str(tmp_path / "probe.deb")], check=True)
    encoded = base64.b64encode((tmp_path / "probe.deb").read_bytes()).decode()
    added = session.sh(
        "vagrant ssh -c 'base64 -d > /tmp/probe.deb && sudo dpkg -i /tmp/probe.deb && "
        "sudo systemd-run --unit factory-drift-listener python3 -m http.server 8123'",
        stdin=encoded,
    )
    assert added.returncode == 0, added.stderr[-2000:]
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    # An emulated guest beside two busy test workers can take longer than ssh-keyscan's
    # default 5 s to answer (a CI rehearsal saw no key at all).
    scan = subprocess.run(
        ["ssh-keyscan", "-T", "60", "-p", config["Port"], config["HostName"]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert scan.stdout.strip(), f"ssh-keyscan read no host key: {scan.stderr[-500:]}"
    (home / ".ssh" / "known_hosts").write_text(scan.stdout)
    address = f"{config['User']}@{config['HostName']}:{config['Port']}"
    result = run_factory(
        "validate", "--host", address, str(demo_delivery), "--identity",
        config["IdentityFile"].strip('"'), "--only", "sbom,firewall",
        "--report-dir", str(tmp_path / "reports"),
        # HOME holds only the box's host key; the delivery's profile names the suite's cache.
        env={"HOME": str(home), "FACTORY_CACHE_DIR": str(cache_dir())},
    )  # fmt: skip
    assert result.returncode == 5, result.stdout + result.stderr  # validation failed
    assert (tmp_path / "reports" / "report.json").is_file(), result.stdout + result.stderr
    checks = {
        c["name"]: c
        for c in json.loads((tmp_path / "reports" / "report.json").read_text())["checks"]
    }
    drift = checks["drift: no package added, removed or changed since the delivery"]
    assert drift["status"] == "failed"
    assert drift["detail"].startswith("added: deb:factory-drift-probe 1.0 (machine:"), drift
    listeners = checks["firewall: only the listed ports listen"]
    assert listeners["status"] == "failed" and "8123" in listeners["detail"], listeners


def test_guide_clean_up_leaves_nothing_behind(tester):
    session, steps = tester
    for section, command in steps:
        if section == CLEAN_UP:
            result = session.sh(command)
            assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
    session.cleaned = True
    assert session.domain not in virsh("list", "--all", "--name").split()
    assert box_volumes() == []
    assert not list(Path(session.env["VAGRANT_HOME"], "boxes").glob("*"))
    deadline = time.monotonic() + 30
    while domain_qemu_pids(session.domain) and time.monotonic() < deadline:
        time.sleep(1)
    assert domain_qemu_pids(session.domain) == set()
