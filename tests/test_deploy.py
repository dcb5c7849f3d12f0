"""`factory deploy --to libvirt` on the real libvirt, with the demo delivery; the vSphere and
Proxmox import commands checked against the delivery's files; bad input through the CLI."""

from __future__ import annotations

import html
import re
import shlex
import socket
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from factory.deploy import key_fingerprint
from factory.deploy_imports import import_commands
from factory.profile import load_profile
from factory.validate.boot import HOST_KEY_BLOCKS
from tests.conftest import run_factory, wait_until
from tests.test_vagrant import domain_qemu_pids, libvirt_running, virsh

DEPLOY_TIMEOUT = 1800  # a TCG boot beside other VMs: minutes
FILE_NAME = re.compile(r"[\w.-]+\.(?:ova|ovf|vmdk|mf|qcow2)\b")
GOVC_IMPORT = "import.ova"  # govc's subcommand, not a file


def one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The CLI refused with exactly one line, this exit code and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def printed(output: str, label: str) -> str:
    match = re.search(rf"^{label}:\s+(\S+)", output, re.M)
    assert match, f"no {label!r} line in:\n{output}"
    return match.group(1)


def scanned_fingerprints(address: str) -> set[str]:
    """The host keys the machine offers on port 22, as ssh-keyscan reads them."""
    scan = subprocess.run(
        ["ssh-keyscan", "-T", "20", address], capture_output=True, text=True, timeout=120
    )
    keys = [line.split(maxsplit=1)[1] for line in scan.stdout.splitlines() if line[:1] != "#"]
    return {f"{key.split()[0]} {key_fingerprint(key)}" for key in keys}


def console_order(console: Path, timeout: float = 180) -> tuple[int, int]:
    """Where on the console the host key block ends and the getty's login prompt is, once the
    prompt has come (the getty starts moments after the keys)."""

    def text() -> str:
        return console.read_text(errors="replace")

    came = wait_until(lambda: " login: " in text(), timeout)
    assert came, f"no login prompt on the console after {timeout} s: {text()[-500:]}"
    now = text()
    return now.find(HOST_KEY_BLOCKS[0][1]), now.find(" login: ")


@pytest.mark.e2e
def test_deploy_boots_the_delivery_on_libvirt_and_destroy_removes_it(demo_delivery: Path):
    name = f"factory-deploy-test-{uuid.uuid4().hex[:8]}"  # a leftover cannot collide
    qcow2 = demo_delivery / "demo_hello_v1.qcow2"
    before = qcow2.stat()
    deploy = ["deploy", str(demo_delivery), "--to", "libvirt", "--name", name]
    with libvirt_running():
        pool_was_there = bool(virsh("pool-info", "default"))
        try:
            result = run_factory(*deploy, timeout=DEPLOY_TIMEOUT)
            assert result.returncode == 0, result.stdout + result.stderr
            # A fresh libvirt (CI's) has no default pool: deploy makes it, and says so.
            made_pool = "libvirt has no 'default' storage pool" in result.stderr
            assert made_pool is not pool_was_there, result.stderr
            assert virsh("pool-info", "default")
            assert "booting:" in result.stderr, "no progress lines while it booted"
            assert virsh("domstate", name).strip() == "running"
            # Under TCG the guest sees AMD's vendor id (factory/cpu.py: no PTI).
            if "tcg" in result.stderr:
                (pid,) = domain_qemu_pids(name)
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                assert b"-cpu Nehalem,vendor=AuthenticAMD" in command, command
            address = printed(result.stdout, "address")
            assert f"ssh analyst@{address}" in result.stdout
            assert f"https://{address}/" in result.stdout

            with socket.create_connection((address, 22), timeout=30) as connection:
                assert connection.recv(64).startswith(b"SSH-2.0-")
            shown = set(re.findall(r"^  (\S+ SHA256:\S+)$", result.stdout, re.M))
            assert shown, result.stdout
            offered = scanned_fingerprints(address)
            assert offered and offered <= shown, f"offered {offered}, printed {shown}"
            # The serial getty flushes what the line has not sent: it must start after them.
            console = Path(re.search(r"on the console \((\S+)\)", result.stderr).group(1))
            keys_end, prompt = console_order(console)
            assert keys_end < prompt, console.read_text(errors="replace")[-3000:]

            again = run_factory(*deploy, timeout=300)
            one_line_error(again, 3, f"{name} is already deployed", "--destroy")

            removed = run_factory(*deploy, "--destroy", timeout=300)
            assert removed.returncode == 0, removed.stderr
            disk = Path(re.search(r"removed (\S+\.qcow2)", removed.stdout).group(1))
            assert disk.name == f"{name}.qcow2"
            assert not disk.exists(), f"{disk} is left behind"
            assert virsh("domstate", name) == "", f"{name} is still defined"
            assert not domain_qemu_pids(name)

            gone = run_factory(*deploy, "--destroy", timeout=300)
            one_line_error(gone, 2, f"{name} is not deployed")
        finally:
            if virsh("domstate", name):
                run_factory(*deploy, "--destroy", timeout=300)
    after = qcow2.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_import_commands_name_the_delivery_and_its_files(demo_delivery: Path):
    """Dry run: every file a vSphere or Proxmox command names is in the delivery, or in the
    OVA that `tar -xf` unpacks, and carries the delivery's name."""
    loaded = load_profile(demo_delivery / "profile.yaml")
    steps = {s.platform: s.commands for s in import_commands(demo_delivery, loaded)}
    assert set(steps) == {"VMware vSphere", "Proxmox VE"}
    ova = demo_delivery / f"{loaded.name}.ova"
    with tarfile.open(ova) as archive:
        in_ova = set(archive.getnames())
    dossier = html.unescape((demo_delivery / "handover.html").read_text())
    for platform, commands in steps.items():
        extracted = any(c.startswith(f"tar -xf {ova.name}") for c in commands)
        for command in commands:
            assert command in dossier, f"handover.html lacks {command!r}"
            if command.startswith("#"):
                continue
            words = [w for w in shlex.split(command)[1:] if w != GOVC_IMPORT]
            for word in words:
                for file in FILE_NAME.findall(word):
                    assert file.startswith(loaded.name), f"{platform}: {file} is not named after it"
                    found = (demo_delivery / file).is_file() or (extracted and file in in_ova)
                    assert found, f"{platform}: {command!r} names {file}, which is not there"
    assert f"govc import.ova -name {loaded.name} {ova.name}" in steps["VMware vSphere"]
    (ovf,) = [m for m in in_ova if m.endswith(".ovf")]
    assert f"qm importovf VMID {ovf} local-lvm" in steps["Proxmox VE"]
    # What the OVF itself names for Proxmox to read must come out of the same tar.
    with tarfile.open(ova) as archive:
        descriptor = archive.extractfile(ovf).read().decode()
    for href in re.findall(r'ovf:href="([^"]+)"', descriptor):
        assert href in in_ova, f"{ovf} names {href}, which the OVA lacks"


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["--to", "vmware"], 2, ["--to vmware", "libvirt[:URI]", "handover.html"]),
        (["--to", "libvirt:qemu+ssh://hv1/system"], 2, ["--to libvirt:qemu+ssh", "this host"]),
        (["--to", "libvirt", "--name", "a b/c"], 2, ["--name 'a b/c'"]),
        # A socket nobody listens on: libvirt does not answer there.
        (["--to", "libvirt:qemu:///system?socket=/nonexistent/sock"], 6, ["libvirt does not"]),
    ],
)
def test_bad_input_is_one_line_with_its_exit_code(demo_delivery: Path, args, code, needles):
    result = run_factory("deploy", str(demo_delivery), *args, timeout=120)
    one_line_error(result, code, *needles)


def test_a_missing_delivery_is_named(tmp_path: Path):
    result = run_factory("deploy", str(tmp_path / "nothing"), "--to", "libvirt", timeout=120)
    one_line_error(result, 2, "DELIVERY", "no such folder", "outputs/<name>")


def test_a_folder_that_is_no_delivery_is_named(tmp_path: Path):
    result = run_factory("deploy", str(tmp_path), "--to", "libvirt", timeout=120)
    one_line_error(result, 2, "DELIVERY", "no profile.yaml")
