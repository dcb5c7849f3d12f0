"""libvirt, as `factory deploy` uses it: virsh for every call (no bindings to build), the domain
XML of a deployed delivery, and the record of what a deployment made (in the domain's own
<metadata>, so that --destroy removes only what deploy created)."""

from __future__ import annotations

import re
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from factory.errors import ExitCode, FactoryError, InfrastructureError
from factory.tools import which

DEFAULT_URI = "qemu:///system"
NETWORK = "default"
POOL = "default"
METADATA_NS = "https://factory.invalid/libvirt/deployment/1"
# libvirt's own folders for a local URI: its per-domain logs live there, and so does our console.
LOG_DIRS = {"/system": Path("/var/log/libvirt/qemu"), "/session": Path("~/.cache/libvirt/qemu/log")}
VIRSH_TIMEOUT_S = 120
ET.register_namespace("factory", METADATA_NS)  # <factory:deployment> in the domain XML


class DeployInputError(FactoryError):
    """The command line names something that does not exist or cannot be deployed."""

    exit_code = ExitCode.BAD_INPUT


class AlreadyDeployed(FactoryError):
    """A domain of that name exists already."""

    exit_code = ExitCode.CONFLICT


@dataclass(frozen=True)
class Deployment:
    """What deploy made on the hypervisor, as its metadata records it."""

    name: str
    delivery: str
    disk: Path
    console: Path


def check_local_uri(uri: str) -> Path:
    """libvirt's log folder for a local URI; the console is read from a file on this host."""
    parts = urlsplit(uri)
    if parts.scheme == "qemu" and not parts.netloc and parts.path in LOG_DIRS:
        return LOG_DIRS[parts.path].expanduser()
    raise DeployInputError(
        f"--to libvirt:{uri}: only this host's libvirt can be deployed to (qemu:///system or "
        "qemu:///session), as its console is read here; run factory deploy on the hypervisor"
    )


def virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run virsh against `uri`; with `check`, a failure raises with virsh's last error line."""
    path = which("virsh")
    if path is None:
        raise InfrastructureError("`virsh` is missing; run `apt-get install -y libvirt-clients`")
    try:
        result = subprocess.run(
            [path, "-q", "-c", uri, *args], capture_output=True, text=True, timeout=VIRSH_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        raise InfrastructureError(
            f"virsh {args[0]} did not answer in {VIRSH_TIMEOUT_S} s at {uri}; is libvirtd hung?"
        ) from error
    if check and result.returncode != 0:
        raise InfrastructureError(
            f"virsh {' '.join(args[:2])} failed at {uri}: {last_error(result)}"
        )
    return result


def last_error(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else f"exit status {result.returncode}"


def check_reachable(uri: str) -> None:
    result = virsh(uri, "uri", check=False)
    if result.returncode != 0:
        raise InfrastructureError(
            f"--to libvirt:{uri}: libvirt does not answer ({last_error(result)}); start it "
            "(`systemctl start libvirtd`, or `virtlogd -d; libvirtd -d` without systemd) or "
            "name another URI"
        )


def check_network(uri: str) -> None:
    info = virsh(uri, "net-info", NETWORK, check=False)
    if info.returncode != 0 or not re.search(r"^Active:\s+yes", info.stdout, re.M):
        raise InfrastructureError(
            f"libvirt's '{NETWORK}' network is not running at {uri}; start it: "
            f"`virsh -c {uri} net-start {NETWORK}`"
        )


def pool_folder(uri: str, log: Callable[[str], None] = print) -> Path:
    """The folder of libvirt's default storage pool, where deployed disks go. A fresh libvirt
    has none until a tool makes it (virt-manager and vagrant-libvirt do): make it as they do."""
    result = virsh(uri, "pool-dumpxml", POOL, check=False)
    if result.returncode != 0:
        folder = default_pool_target(uri)
        log(f"libvirt has no '{POOL}' storage pool at {uri}: making it in {folder}")
        for args in (
            ("pool-define-as", POOL, "dir", "--target", str(folder)),
            ("pool-build", POOL),
            ("pool-start", POOL),
            ("pool-autostart", POOL),
        ):
            virsh(uri, *args)
        result = virsh(uri, "pool-dumpxml", POOL)
    path = ET.fromstring(result.stdout).findtext("target/path")
    if not path:
        raise InfrastructureError(f"libvirt's '{POOL}' pool at {uri} is not a folder pool")
    return Path(path)


def default_pool_target(uri: str) -> Path:
    """Where libvirt's own tools put the default pool: the system's images folder, or the
    user's for a session URI."""
    if uri.endswith("/session"):
        return Path.home() / ".local/share/libvirt/images"
    return Path("/var/lib/libvirt/images")


def domain_exists(uri: str, name: str) -> bool:
    return virsh(uri, "domstate", name, check=False).returncode == 0


def domain_state(uri: str, name: str) -> str:
    result = virsh(uri, "domstate", "--reason", name, check=False)
    return result.stdout.strip() if result.returncode == 0 else "gone"


def deployment_of(uri: str, name: str) -> Deployment | None:
    """What deploy recorded in the domain `name`, or None when deploy did not make it."""
    record = ET.fromstring(virsh(uri, "dumpxml", name).stdout).find(
        f"metadata/{{{METADATA_NS}}}deployment"
    )
    if record is None:
        return None
    return Deployment(
        name=name,
        delivery=record.findtext(f"{{{METADATA_NS}}}delivery", ""),
        disk=Path(record.findtext(f"{{{METADATA_NS}}}disk", "")),
        console=Path(record.findtext(f"{{{METADATA_NS}}}console", "")),
    )


@dataclass(frozen=True)
class DomainSpec:
    deployment: Deployment
    domain_type: str  # "kvm" or "qemu" (TCG)
    cpu_model: str
    cpus: int
    memory_mib: int
    cpu_vendor_id: str | None = None  # factory.cpu.TCG_VENDOR_ID under TCG


def domain_xml(spec: DomainSpec) -> str:
    """A BIOS machine with the delivered disk (virtio), one NIC on the default network, the
    serial console logged to a file, and the guest agent's channel."""
    deployment = spec.deployment
    domain = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(domain, "name").text = deployment.name
    metadata = ET.SubElement(ET.SubElement(domain, "metadata"), f"{{{METADATA_NS}}}deployment")
    for field in ("delivery", "disk", "console"):
        ET.SubElement(metadata, f"{{{METADATA_NS}}}{field}").text = str(getattr(deployment, field))
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.cpus)
    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    cpu = ET.SubElement(domain, "cpu", mode="custom", match="exact", check="none")
    model = ET.SubElement(cpu, "model", fallback="forbid")
    model.text = spec.cpu_model
    if spec.cpu_vendor_id:
        model.set("vendor_id", spec.cpu_vendor_id)
    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=str(deployment.disk))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    nic = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(nic, "source", network=NETWORK)
    ET.SubElement(nic, "model", type="virtio")
    # A pty, so `virsh console` works, logged to a file by virtlogd (factory reads it).
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=str(deployment.console), append="off")
    ET.SubElement(serial, "target", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    # SeaBIOS waits for ever without a display adapter; no one needs to connect to it.
    ET.SubElement(ET.SubElement(devices, "video"), "model", type="vga")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    return ET.tostring(domain, encoding="unicode")


def define_and_start(uri: str, spec: DomainSpec) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="factory-domain-") as xml:
        xml.write(domain_xml(spec))
        xml.flush()
        virsh(uri, "define", xml.name)
    started = virsh(uri, "start", spec.deployment.name, check=False)
    if started.returncode != 0:
        remove_domain(uri, spec.deployment)
        raise InfrastructureError(
            f"libvirt at {uri} could not start {spec.deployment.name}: {last_error(started)}"
        )


def remove_domain(uri: str, deployment: Deployment) -> None:
    """Stop and undefine the domain, and remove the disk and logs it made."""
    if domain_exists(uri, deployment.name):
        virsh(uri, "destroy", deployment.name, check=False)  # fails when already shut off
        virsh(uri, "undefine", deployment.name)
    deployment.disk.unlink(missing_ok=True)
    deployment.console.unlink(missing_ok=True)
    # libvirt's own log of the domain, beside the console's (libvirt keeps it after undefine)
    deployment.console.with_name(f"{deployment.name}.log").unlink(missing_ok=True)
    virsh(uri, "pool-refresh", POOL, check=False)


def ipv4_address(uri: str, name: str) -> str | None:
    """The domain's IPv4 address from the network's DHCP lease, else the host's ARP table."""
    for source in ("lease", "arp"):
        result = virsh(uri, "domifaddr", name, "--source", source, check=False)
        found = re.search(r"\bipv4\s+(\d+\.\d+\.\d+\.\d+)/", result.stdout)
        if found:
            return found.group(1)
    return None
