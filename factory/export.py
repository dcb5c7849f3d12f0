"""The export stage: the qcow2 that Packer built in, delivery artifacts out.

Artifacts: a compressed qcow2 and an OVA (OVF descriptor, streamOptimized VMDK, manifest);
the boxes are boxes.py and the delivery folder around them delivery.py. Every artifact is
written into a staging directory inside the output directory and moved into place only when it
is complete, so an interrupted export never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory import __version__, tools
from factory.errors import FactoryError, ToolError
from factory.files import staging_dir
from factory.profile import LoadedProfile
from factory.signing import Signer, ova_certificate_text
from factory.templates import render_template

NETWORK_NAME = "VM Network"


@dataclass(frozen=True)
class OvfFlavor:
    """The OVF version an OVA is written in and the manifest digest that version prescribes."""

    ovf_version: str
    namespace: str
    manifest_label: str


OVF1_NAMESPACE = "http://schemas.dmtf.org/ovf/envelope/1"
OVF2_NAMESPACE = "http://schemas.dmtf.org/ovf/envelope/2"
# The manifest digest picks the OVF version, so that readers that go by the spec (COT) agree:
# DSP0243 1.x prescribes SHA1, 2.x SHA256. The default is OVF 1.0 + SHA1 because every importer
# reads OVF 1.0 (vSphere, VirtualBox, Proxmox `qm importovf`, oVirt, virt-v2v), while OVF 2.0
# is not read by Proxmox and older vSphere. The digest only guards the transfer, it signs nothing.
OVA_DIGESTS = {
    "sha1": OvfFlavor("1.0", OVF1_NAMESPACE, "SHA1"),
    "sha256": OvfFlavor("2.0", OVF2_NAMESPACE, "SHA256"),
}
# A signed OVA is what ovftool writes and vSphere checks: an OVF 1.0 descriptor (read by every
# importer) with a SHA256 manifest and certificate, since a signature over SHA1 digests proves
# little. COT takes the digest from the OVF version and so misreads this manifest as SHA1.
SIGNED_OVA = OvfFlavor("1.0", OVF1_NAMESPACE, "SHA256")
DEFAULT_OVA_DIGEST = "sha1"
# ustar stores a member's size in 11 octal digits.
USTAR_MAX_MEMBER_SIZE = 8**11 - 1
# 80 keeps "<name>-disk1.vmdk" within ustar's 100-byte member name.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,80}")
# Characters XML 1.0 forbids even when escaped.
XML_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class GuestOs:
    ovf_id: int  # CIM_OperatingSystem.OsType, as in OVF's OperatingSystemSection
    vmw_os_type: str
    description: str


GUEST_OS_TYPES = {
    "debian": GuestOs(96, "debian12_64Guest", "Debian GNU/Linux 12 (64-bit)"),
    "ubuntu": GuestOs(94, "ubuntu64Guest", "Ubuntu Linux (64-bit)"),
}


@dataclass(frozen=True)
class Product:
    """The OVF ProductSection: what the appliance is, who delivers it, which build made it."""

    name: str
    version: str = ""
    vendor: str = ""  # the delivery team; left out when unknown
    full_version: str = ""  # the factory revision that built the image

    def __post_init__(self) -> None:
        for field in ("name", "version", "vendor", "full_version"):
            value = getattr(self, field)
            if not isinstance(value, str) or XML_FORBIDDEN.search(value):
                raise FactoryError(
                    f"product.{field} must be text without control characters; XML cannot hold them"
                )


@dataclass(frozen=True)
class VirtualHardware:
    name: str
    cpus: int
    memory_mib: int
    disk_gib: int
    os_type: str = "debian"
    description: str = ""
    product: Product | None = None  # None: the ProductSection names only the VM

    def __post_init__(self) -> None:
        check_artifact_name(self.name)
        for field in ("cpus", "memory_mib", "disk_gib"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FactoryError(f"hardware.{field} must be a positive integer, got {value!r}")
        if self.os_type not in GUEST_OS_TYPES:
            known = ", ".join(sorted(GUEST_OS_TYPES))
            raise FactoryError(
                f"hardware.os_type {self.os_type!r} is not supported; use one of: {known}"
            )
        if not isinstance(self.description, str) or XML_FORBIDDEN.search(self.description):
            raise FactoryError(
                "hardware.description must be text without control characters; XML cannot hold them"
            )

    @property
    def guest_os(self) -> GuestOs:
        return GUEST_OS_TYPES[self.os_type]


def virtual_hardware(
    loaded: LoadedProfile, vendor: str = "", full_version: str = ""
) -> VirtualHardware:
    """The virtual machine a profile's artifacts describe. Its product is client_project at
    version vN; `vendor` and `full_version` are known only where the delivery is made."""
    profile, resources = loaded.profile, loaded.profile.resources
    return VirtualHardware(
        name=loaded.name,
        cpus=resources.cpus,
        memory_mib=resources.memory,
        disk_gib=resources.disk,
        description=profile.description,
        product=Product(
            name=f"{profile.client}_{profile.project}".replace("-", "_"),
            version=f"v{profile.version}",
            vendor=vendor,
            full_version=full_version,
        ),
    )


def check_artifact_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise FactoryError(
            f"artifact name {name!r} is invalid: use 1-80 letters, digits, '_' or '-'"
        )


# --- external tools -------------------------------------------------------------------------


def run_tool(args: list[str], what: str, ok_codes: tuple[int, ...] = (0,)) -> str:
    """Run a tool and return its stdout; raise ToolError with its last stderr line on failure
    (or, when the tool is missing, the package that provides it)."""
    command = [tools.require(args[0]), *args[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode not in ok_codes:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {result.returncode}"
        raise ToolError(f"{what} failed: {args[0]}: {detail}")
    return result.stdout


def qemu_img_info(disk: Path) -> dict:
    return json.loads(run_tool(["qemu-img", "info", "--output=json", str(disk)], f"reading {disk}"))


def _populated_size(disk: Path, fmt: str) -> int:
    """Bytes of the disk that hold data, which is what OVF's populatedSize means."""
    extents = json.loads(
        run_tool(["qemu-img", "map", "--output=json", "-f", fmt, str(disk)], f"mapping {disk}")
    )
    return sum(extent["length"] for extent in extents if extent.get("data"))


def input_disk_format(disk: Path) -> str:
    """The disk's format as qemu-img sees it, after checking that a qcow2 is sound.

    Both checks guard against exporting garbage without an error: qemu-img reads a file it
    does not recognise as raw, and reads the missing tables of a truncated qcow2 as zeros.
    """
    if not Path(disk).is_file():
        raise FactoryError(f"disk image {disk} does not exist; run the build stage first")
    fmt = qemu_img_info(disk)["format"]
    if Path(disk).suffix == ".qcow2" and fmt != "qcow2":
        raise FactoryError(f"{disk} is not a qcow2 image (qemu-img reads it as {fmt}); rebuild it")
    if fmt == "qcow2":
        # Exit status 2 is corruption (counted below); 3 is leaked clusters only, which is
        # wasted space, not damage.
        report = run_tool(
            ["qemu-img", "check", "--output=json", "-f", "qcow2", str(disk)],
            f"checking {disk}",
            ok_codes=(0, 2, 3),
        )
        corruptions = json.loads(report).get("corruptions", 0)
        if corruptions:
            raise FactoryError(
                f"{disk} is damaged (qemu-img check found {corruptions} corruptions); rebuild it"
            )
    return fmt


# --- qcow2 ----------------------------------------------------------------------------------


def export_qcow2(built_qcow2: Path, out_dir: Path, name: str, log: Callable = print) -> Path:
    """Copy the built image to out_dir/<name>.qcow2, compressed."""
    check_artifact_name(name)
    fmt = input_disk_format(built_qcow2)
    out_dir = Path(out_dir)
    target = out_dir / f"{name}.qcow2"
    with staging_dir(out_dir) as staging:
        log(f"export: compressing {built_qcow2.name} into {target.name}")
        scratch = staging / target.name
        run_tool(
            ["qemu-img", "convert", "-c", "-f", fmt, "-O", "qcow2", str(built_qcow2), str(scratch)],
            f"compressing {built_qcow2}",
        )
        os.replace(scratch, target)
    return target


# --- OVA ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OvfDisk:
    file_name: str
    file_size: int
    capacity: int
    populated_size: int


def render_ovf(
    hardware: VirtualHardware,
    disks: _OvfDisk | list[_OvfDisk],
    digest: str = DEFAULT_OVA_DIGEST,
) -> str:
    """The OVF descriptor: the first disk boots; the others follow it on the same controller."""
    return _descriptor(hardware, disks, _ovf_flavor(digest))


def _descriptor(
    hardware: VirtualHardware, disks: _OvfDisk | list[_OvfDisk], flavor: OvfFlavor
) -> str:
    disks = [disks] if isinstance(disks, _OvfDisk) else list(disks)
    text = render_template(
        "ovf.xml.j2",
        hw=hardware,
        guest_os=hardware.guest_os,
        disks=disks,
        ovf_namespace=flavor.namespace,
        network=NETWORK_NAME,
        factory_version=__version__,
    )
    try:
        ET.fromstring(text.encode("utf-8"))
    except ET.ParseError as error:  # a template bug, not a user error
        raise FactoryError(f"rendered OVF descriptor is not well-formed XML: {error}") from error
    return text


def _ovf_flavor(digest: str) -> OvfFlavor:
    if digest not in OVA_DIGESTS:
        raise FactoryError(
            f"OVA manifest digest {digest!r} is not supported; use 'sha1' (OVF 1.0) "
            "or 'sha256' (OVF 2.0)"
        )
    return OVA_DIGESTS[digest]


def ova_flavor(digest: str | None, signed: bool) -> OvfFlavor:
    """The OVA's OVF version and manifest digest: as `digest` asks (default sha1), or, for a
    signed OVA, SIGNED_OVA, which a SHA1 manifest would defeat."""
    if not signed:
        return _ovf_flavor(digest or DEFAULT_OVA_DIGEST)
    if digest not in (None, "sha256"):
        raise FactoryError(
            f"--ova-digest {digest}: the profile signs its deliveries (signing.key), and a signed "
            "OVA carries a SHA256 manifest; leave --ova-digest out"
        )
    return SIGNED_OVA


def convert_to_stream_vmdk(disk: Path, fmt: str, vmdk: Path) -> _OvfDisk:
    """Write `disk` as a streamOptimized VMDK and describe it for the OVF descriptor."""
    run_tool(
        [
            "qemu-img",
            "convert",
            "-f",
            fmt,
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized,adapter_type=lsilogic",
            str(disk),
            str(vmdk),
        ],  # fmt: skip
        f"converting {disk} to VMDK",
    )
    vmdk_size = vmdk.stat().st_size
    if vmdk_size > USTAR_MAX_MEMBER_SIZE:
        raise FactoryError(
            f"{vmdk.name} is {vmdk_size} bytes, over the 8 GiB ustar member limit of an OVA; "
            "shrink the image or deliver the qcow2 instead"
        )
    return _OvfDisk(
        file_name=vmdk.name,
        file_size=vmdk_size,
        capacity=qemu_img_info(vmdk)["virtual-size"],
        populated_size=_populated_size(disk, fmt),
    )


def pack_ustar(archive: Path, folder: Path, members: list[str]) -> None:
    """A POSIX ustar archive of folder's members, in the given order, owned by root.

    GNU tar, not tarfile: vSphere has rejected OVAs written by Python's tarfile."""
    run_tool(
        [
            "tar",
            "--format=ustar",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
            str(archive),
            "-C",
            str(folder),
            *members,
        ],  # fmt: skip
        f"packing {archive.name}",
    )


def _file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def export_ova(
    disk: Path,
    hardware: VirtualHardware,
    out_dir: Path,
    digest: str | None = None,
    log: Callable = print,
    signer: Signer | None = None,
) -> Path:
    """Package the disk as out_dir/<name>.ova: OVF descriptor, streamOptimized VMDK, manifest,
    and with a signer the certificate <name>.cert, last.

    digest="sha1" writes OVF 1.0 with a SHA1 manifest (the default, read by every importer);
    "sha256" writes OVF 2.0 with a SHA256 manifest (see OVA_DIGESTS); a signed OVA is OVF 1.0
    with a SHA256 manifest (SIGNED_OVA).
    """
    flavor = ova_flavor(digest, signed=signer is not None)
    disk, out_dir = Path(disk), Path(out_dir)
    fmt = input_disk_format(disk)
    name = hardware.name
    ovf_name, vmdk_name, mf_name = f"{name}.ovf", f"{name}-disk1.vmdk", f"{name}.mf"
    cert_name = f"{name}.cert"
    target = out_dir / f"{name}.ova"

    with staging_dir(out_dir) as staging:
        log(f"export: converting {disk.name} to streamOptimized VMDK")
        ovf_disk = convert_to_stream_vmdk(disk, fmt, staging / vmdk_name)
        if ovf_disk.capacity != hardware.disk_gib * 2**30:
            log(
                f"export: note: disk is {ovf_disk.capacity} bytes, profile says "
                f"{hardware.disk_gib} GiB; the OVF uses the disk's real size"
            )

        log(f"export: writing OVF {flavor.ovf_version} descriptor {ovf_name}")
        descriptor = _descriptor(hardware, ovf_disk, flavor)
        (staging / ovf_name).write_text(descriptor, encoding="utf-8")

        log(f"export: writing {flavor.manifest_label} manifest {mf_name}")
        algorithm = flavor.manifest_label.lower()
        manifest = "".join(
            f"{flavor.manifest_label}({member})= {_file_digest(staging / member, algorithm)}\n"
            for member in (ovf_name, vmdk_name)
        ).encode("ascii")
        (staging / mf_name).write_bytes(manifest)
        members = [ovf_name, vmdk_name, mf_name]
        if signer is not None:
            log(f"export: signing {mf_name} as {signer.name!r} into {cert_name}")
            (staging / cert_name).write_text(
                ova_certificate_text(signer, mf_name, manifest), encoding="ascii"
            )
            members.append(cert_name)

        log(f"export: packing {target.name}")
        scratch_ova = staging / target.name
        pack_ustar(scratch_ova, staging, members)
        os.replace(scratch_ova, target)
    return target
