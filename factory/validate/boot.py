"""Boot the exported OVA's disk on a throwaway overlay, the way an importer would."""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from factory import kvm, seed
from factory.errors import FactoryError, ToolError
from factory.escape import cloud_config
from factory.export import qemu_img_info
from factory.keys import KeyPair, ephemeral_keypair
from factory.processes import die_with_parent, stop

VALIDATOR_USER = "factory-validate"
HOST_KEY_BLOCKS = [
    ("-----BEGIN FACTORY SSH HOST KEYS-----", "-----END FACTORY SSH HOST KEYS-----"),
    ("-----BEGIN SSH HOST KEY KEYS-----", "-----END SSH HOST KEY KEYS-----"),
]
# Booted as an importer boots it, the disk is also made this much larger, as importers often
# do: the image must grow its root file system to fill it.
IMPORTER_EXTRA_DISK_BYTES = 1 << 30


@dataclass(frozen=True)
class BootedVM:
    ssh_port: int
    host_keys: list[str]
    key: KeyPair
    console_log: Path
    boot_seconds: float
    forwards: dict[int, int]  # guest TCP port -> host port on 127.0.0.1
    agent_socket: Path | None = None  # the QEMU guest agent's channel, when it has one
    delivered_disk_bytes: int = 0  # the delivered disk's size; the VM's may be larger
    disk_bytes: int = 0  # the size of the disk the VM booted with


def extract_ova_disk(ova: Path, dest: Path) -> Path:
    """Extract the VMDK named by the OVA (the only disk) into dest."""
    with tarfile.open(ova) as archive:
        disks = [m for m in archive.getmembers() if m.name.endswith(".vmdk")]
        if len(disks) != 1 or "/" in disks[0].name:
            raise FactoryError(f"{ova}: expected exactly one .vmdk at the top of the OVA")
        archive.extract(disks[0], dest, filter="data")
    return dest / disks[0].name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _seed_iso(folder: Path, key: KeyPair) -> Path:
    """A NoCloud seed that adds the validator's temporary, key-only login."""
    user_data = cloud_config(seed.temporary_login(VALIDATOR_USER, key.public_key))
    return seed.write_seed_iso(folder, user_data, seed.meta_data("factory-validate", "validate"))


def host_keys_from_console(text: str) -> list[str]:
    """The SSH host public keys the guest printed on its serial console at boot."""
    for begin, end in HOST_KEY_BLOCKS:
        match = re.search(re.escape(begin) + r"(.*?)" + re.escape(end), text, re.S)
        if match:
            keys = []
            for line in match.group(1).splitlines():
                line = re.sub(r"^.*?(?=(ssh-|ecdsa-))", "", line.strip())
                if re.match(r"^(ssh-|ecdsa-)\S+ \S+", line) and whole_key(line):
                    keys.append(" ".join(line.split()[:2]))
            if keys:
                return keys
    return []


def whole_key(line: str) -> bool:
    """Whether an OpenSSH public key line arrived whole: a line the serial console cut or
    interleaved must be neither pinned nor shown to anyone as the machine's key."""
    key_type, blob = line.split()[:2]
    try:
        load_ssh_public_key(f"{key_type} {blob}".encode())
    except UnsupportedAlgorithm:  # a type cryptography cannot read: its header must still match
        try:
            raw = base64.b64decode(blob, validate=True)
        except binascii.Error:
            return False
        return raw[4 : 4 + int.from_bytes(raw[:4], "big")] == key_type.encode()
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def boot_delivery(
    disk: Path,
    memory_mib: int,
    cpus: int,
    accelerator: str,
    cpu_model: str | None = None,
    restrict_network: bool = False,
    forward_ports: list[int] | None = None,
    timeout: float = 900,
    seed: bool = True,
    log=print,
) -> Iterator[BootedVM]:
    """Boot `disk` (read-only, through an overlay) and yield once its host keys are known.
    With `seed`, a NoCloud seed disk adds the validator's login; without it the VM boots as an
    importer's does, and the guest agent's channel is its only way in."""
    work = Path(tempfile.mkdtemp(prefix="factory-validate-"))
    process: subprocess.Popen | None = None
    try:
        with ephemeral_keypair("factory-validate") as key:
            overlay = work / "overlay.qcow2"
            fmt = "vmdk" if disk.suffix == ".vmdk" else "qcow2"
            delivered = qemu_img_info(disk)["virtual-size"]
            size = delivered + (0 if seed else IMPORTER_EXTRA_DISK_BYTES)
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt,
                 "-b", str(disk.resolve()), str(overlay), str(size)],
                check=True,
            )  # fmt: skip
            forwards = {guest: _free_port() for guest in {22, *(forward_ports or [])}}
            port = forwards[22]
            console = work / "console.log"
            netdev = "user,id=net0," + ",".join(
                f"hostfwd=tcp:127.0.0.1:{host_port}-:{guest}"
                for guest, host_port in sorted(forwards.items())
            )
            if restrict_network:
                netdev += ",restrict=on"
            command = ["qemu-system-x86_64", *kvm.qemu_accel_args(accelerator, cpu_model)]
            command += ["-m", str(memory_mib), "-smp", str(cpus)]
            command += ["-display", "none", "-serial", f"file:{console}"]
            command += ["-drive", f"file={overlay},if=virtio,format=qcow2"]
            agent = None
            if seed:
                seed_iso = _seed_iso(work, key)
                command += ["-drive", f"file={seed_iso},if=virtio,format=raw,readonly=on"]
            else:
                agent = work / "agent.sock"
                command += ["-chardev", f"socket,path={agent},server=on,wait=off,id=agent"]
                command += ["-device", "virtio-serial"]
                command += [
                    "-device",
                    "virtserialport,chardev=agent,name=org.qemu.guest_agent.0",
                ]
            command += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]
            log(f"booting {disk.name} ({accelerator}, ssh on 127.0.0.1:{port})")
            started = time.monotonic()
            stderr = work / "qemu-stderr.log"  # a file: a pipe nobody drains can stall QEMU
            with open(stderr, "wb") as errors:
                process = subprocess.Popen(
                    command,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            keys = wait_for_host_keys(process, console, stderr, started + timeout)
            seconds = time.monotonic() - started
            yield BootedVM(port, keys, key, console, seconds, forwards, agent, delivered, size)
    finally:
        if process is not None:
            stop(process, group=False, grace=20)
        shutil.rmtree(work, ignore_errors=True)


KERNEL_PANIC = "Kernel panic - not syncing"


class Running(Protocol):
    """What wait_for_host_keys watches: a QEMU process, or a libvirt domain (factory.deploy)."""

    returncode: int | None

    def poll(self) -> int | None: ...


def wait_for_host_keys(process: Running, console: Path, stderr: Path, deadline: float) -> list[str]:
    """The SSH host keys the first boot prints on `console`, once they are there; raises when
    `process` stops first (with `stderr`'s text), the kernel panics or `deadline` passes."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = stderr.read_text(errors="replace")
            raise ToolError(f"QEMU exited early (code {process.returncode}): {error.strip()}")
        if console.exists():
            text = console.read_text(errors="replace")
            keys = host_keys_from_console(text)
            if keys:
                return keys
            panic = next((line for line in text.splitlines() if KERNEL_PANIC in line), None)
            if panic:  # it will never print them: say so now, not at the deadline
                raise FactoryError(
                    f"the image's kernel panicked while booting: {panic.strip()[:200]!r} "
                    f"(whole console: {_keep_console(text)})"
                )
        time.sleep(2)
    text = console.read_text(errors="replace") if console.exists() else ""
    last = [line.strip() for line in text.splitlines() if line.strip()][-1:] or ["(empty)"]
    raise FactoryError(
        "the image did not print its SSH host keys on the serial console in time; its console "
        f"ends with {last[0][:160]!r} (whole console: {_keep_console(text)})"
    )


def _keep_console(text: str) -> Path:
    kept = Path(tempfile.mkdtemp(prefix="factory-boot-failed-")) / "console.log"
    kept.write_text(text)
    return kept
