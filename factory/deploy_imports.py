"""The commands that import a delivery on the client's own vSphere or Proxmox VE, named after
the delivery's own files: its OVA, and the OVF inside it. The dossier prints them."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from factory.delivery import Delivery
from factory.profile import LoadedProfile

# Proxmox's CPU type for each cpu_baseline (Proxmox VE 8 names the levels itself).
PROXMOX_CPU_TYPES = {
    "x86-64-v1": "kvm64",
    "x86-64-v2": "x86-64-v2-AES",
    "x86-64-v3": "x86-64-v3",
    "x86-64-v4": "x86-64-v4",
}


@dataclass(frozen=True)
class ImportSteps:
    platform: str
    commands: list[str]  # shell lines, run in the delivery folder; '#' lines explain


def ova_members(ova: Path) -> list[str]:
    with tarfile.open(ova) as archive:
        return archive.getnames()


def import_commands(folder: Path, loaded: LoadedProfile) -> list[ImportSteps]:
    """The commands that import this delivery on vSphere and Proxmox VE, named after the
    delivery's own files: its OVA, and the OVF inside it (NAME.ovf, as factory writes it, while
    the OVA is not there)."""
    name = loaded.name
    ova = Delivery(Path(folder), name).ova
    members = ova_members(ova) if ova.is_file() else [f"{name}.ovf"]
    (ovf,) = [member for member in members if member.endswith(".ovf")]
    proxmox_cpu = PROXMOX_CPU_TYPES[loaded.profile.cpu_baseline]
    vsphere = [
        "# govc reads the vCenter from GOVC_URL, GOVC_USERNAME and GOVC_PASSWORD",
        f"govc import.ova -name {name} {ova.name}",
        f"govc vm.power -on {name}",
        "# or with ovftool:",
        f"ovftool --name={name} --powerOn {ova.name} 'vi://USER@VCENTER/DATACENTER/host/CLUSTER'",
        f"# or: vSphere Client, Deploy OVF Template, Local file: {ova.name}",
    ]
    proxmox = [
        "# on the Proxmox node; VMID is a free id (pvesh get /cluster/nextid), local-lvm the "
        "storage for the disk",
        f"tar -xf {ova.name}",
        f"qm importovf VMID {ovf} local-lvm",
        f"qm set VMID --net0 virtio,bridge=vmbr0 --agent enabled=1 --cpu {proxmox_cpu} "
        "--serial0 socket",
        "qm start VMID",
    ]
    return [ImportSteps("VMware vSphere", vsphere), ImportSteps("Proxmox VE", proxmox)]
