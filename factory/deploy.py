"""Put a delivery on a hypervisor: `factory deploy DELIVERY --to libvirt[:URI]` boots it on
this host's libvirt and says how to reach it (vSphere and Proxmox: deploy_imports.py)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory import host, kvm
from factory.cpu import validation_cpu
from factory.delivery import open_delivery
from factory.deploy_libvirt import (
    DEFAULT_URI,
    POOL,
    AlreadyDeployed,
    DeployInputError,
    Deployment,
    DomainSpec,
    check_local_uri,
    check_network,
    check_reachable,
    define_and_start,
    deployment_of,
    domain_exists,
    domain_state,
    ipv4_address,
    pool_folder,
    remove_domain,
    virsh,
)
from factory.errors import ExitCode, FactoryError
from factory.validate.boot import wait_for_host_keys

TARGETS = ("libvirt",)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PROGRESS_EVERY_S = 30
ADDRESS_TIMEOUT_S = 180


def libvirt_uri(to: str) -> str:
    """The libvirt URI of `--to libvirt[:URI]`; any other target is refused in one line."""
    target, _, uri = to.partition(":")
    if target not in TARGETS:
        raise DeployInputError(
            f"--to {to}: factory deploys only to libvirt[:URI] (e.g. --to libvirt or --to "
            "libvirt:qemu:///system); for vSphere and Proxmox run the import commands in the "
            "delivery's handover.html"
        )
    return uri or DEFAULT_URI


def check_domain_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise DeployInputError(
            f"--name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit (it names the domain and its disk)"
        )
    return name


@dataclass(frozen=True)
class Deployed:
    """A booted deployment and how to reach it."""

    deployment: Deployment
    address: str
    host_keys: list[str]
    admin_user: str
    jupyter: bool
    seconds: float
    description: str  # accelerator, CPU model and size


def key_fingerprint(public_key: str) -> str:
    """`ssh-keygen -l`'s SHA256 fingerprint of an OpenSSH public key line."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class _BootingDomain:
    """The domain seen as the process that validate.boot waits on: `poll()` is None while it
    runs. Each poll also logs a progress line now and then (a TCG boot takes minutes)."""

    def __init__(self, uri: str, deployment: Deployment, why_stopped: Path, log: Callable):
        self.uri, self.deployment, self.why_stopped, self.log = uri, deployment, why_stopped, log
        self.started = self.last_report = time.monotonic()
        self.returncode: int | None = None

    def poll(self) -> int | None:
        state = domain_state(self.uri, self.deployment.name)
        if not state.startswith(("running", "paused")):
            self.why_stopped.write_text(f"the domain is {state}; see libvirt's log of it")
            self.returncode = 1
            return self.returncode
        now = time.monotonic()
        if now - self.last_report >= PROGRESS_EVERY_S:
            self.last_report = now
            self.log(f"  booting: {now - self.started:.0f} s, console: {self._console_tail()}")
        return None

    def _console_tail(self) -> str:
        console = self.deployment.console
        text = console.read_text(errors="replace") if console.exists() else ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return repr(lines[-1][:100]) if lines else "(nothing yet)"


def deploy_to_libvirt(
    delivery_folder: Path,
    uri: str,
    name: str | None = None,
    accelerator: str = "auto",
    timeout: float = 900,
    log: Callable[[str], None] = print,
) -> Deployed:
    """Copy the delivery's qcow2 into libvirt's default pool, define and start a domain sized
    from the profile (capped to this host), and wait for its host keys and address."""
    if not Path(delivery_folder).is_dir():
        raise DeployInputError(
            f"DELIVERY {delivery_folder}: no such folder; give a delivery folder (outputs/<name>)"
        )
    try:
        opened = open_delivery(delivery_folder)
    except FactoryError as error:
        if error.exit_code != ExitCode.FAILED:  # the profile's own error keeps its code
            raise
        raise DeployInputError(f"DELIVERY {error}") from error
    profile = opened.loaded.profile
    name = check_domain_name(name or opened.delivery.name)
    log_dir = check_local_uri(uri)
    check_reachable(uri)
    if domain_exists(uri, name):
        raise AlreadyDeployed(
            f"{name} is already deployed at {uri}; remove it first with --destroy, or give "
            "another --name"
        )
    check_network(uri)
    accel = kvm.choose_accelerator(accelerator)
    cpu = validation_cpu(profile.cpu_baseline, accel)
    size = host.local_vm_size(profile.resources.cpus, profile.resources.memory)
    disk = pool_folder(uri, log) / f"{name}.qcow2"
    if disk.exists():
        raise AlreadyDeployed(f"{disk} exists already; remove it or give another --name")
    deployment = Deployment(name, str(opened.delivery.path), disk, log_dir / f"{name}-console.log")
    log(f"copying {opened.delivery.qcow2.name} into libvirt's '{POOL}' pool as {disk}")
    shutil.copyfile(opened.delivery.qcow2, disk)  # the delivery itself is never written
    virsh(uri, "pool-refresh", POOL, check=False)
    description = f"CPU {cpu.describe()}, {size.cpus} CPUs, {size.memory_mib} MiB"
    log(f"starting {name} at {uri}: {description}")
    started = time.monotonic()
    try:
        define_and_start(uri, DomainSpec(deployment, "kvm" if accel == "kvm" else "qemu",
                                         cpu.model, size.cpus, size.memory_mib,
                                         cpu.vendor_id))  # fmt: skip
    except BaseException:
        disk.unlink(missing_ok=True)
        raise
    log(f"waiting for its SSH host keys on the console ({deployment.console})")
    try:
        keys = _wait_for_boot(uri, deployment, started + timeout, log)
        address = _wait_for_address(uri, name, time.monotonic() + ADDRESS_TIMEOUT_S)
        _wait_for_ssh(address, time.monotonic() + ADDRESS_TIMEOUT_S)
    except FactoryError as error:
        raise type(error)(
            f"{error}; {name} is left as it is for a look (virsh -c {uri} console {name}): "
            f"remove it with `factory deploy {delivery_folder} --to libvirt:{uri} --name {name} "
            "--destroy`"
        ) from error
    return Deployed(deployment, address, keys, profile.admin.user, profile.jupyter.enabled,
                    time.monotonic() - started, description)  # fmt: skip


def _wait_for_boot(uri: str, deployment: Deployment, deadline: float, log: Callable) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="factory-deploy-") as scratch:
        why_stopped = Path(scratch) / "why-stopped.txt"
        why_stopped.touch()
        domain = _BootingDomain(uri, deployment, why_stopped, log)
        return wait_for_host_keys(domain, deployment.console, why_stopped, deadline)


def _wait_for_address(uri: str, name: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        address = ipv4_address(uri, name)
        if address:
            return address
        time.sleep(2)
    raise FactoryError(
        f"{name} booted but got no IPv4 address on libvirt's network in {ADDRESS_TIMEOUT_S} s "
        f"(virsh -c {uri} domifaddr {name})"
    )


def _wait_for_ssh(address: str, deadline: float) -> None:
    """The host keys print before sshd listens: wait until a login could start."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((address, 22), timeout=10):
            return
        time.sleep(2)
    raise FactoryError(f"{address} printed its host keys but SSH (port 22) does not answer")


def destroy_on_libvirt(delivery_folder: Path, uri: str, name: str | None = None) -> Deployment:
    """Stop and undefine what deploy made, and remove its disk and console log."""
    check_local_uri(uri)
    check_reachable(uri)
    name = check_domain_name(name or _delivery_name(Path(delivery_folder)))
    if not domain_exists(uri, name):
        raise DeployInputError(
            f"{name} is not deployed at {uri}, nothing to destroy (deployed with another --name?)"
        )
    deployment = deployment_of(uri, name)
    if deployment is None:
        raise DeployInputError(
            f"the domain {name} at {uri} was not made by factory deploy; it is left alone"
        )
    remove_domain(uri, deployment)
    return deployment


def _delivery_name(folder: Path) -> str:
    """The delivery's name, after its qcow2; the folder's when it is gone."""
    disks = sorted(folder.glob("*.qcow2"))
    return disks[0].stem if len(disks) == 1 else folder.name
