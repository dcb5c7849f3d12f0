"""What this build host can give a VM: the build and validation VMs are the profile's hardware
capped to it. (The host report is doctor.py; the accelerator and the KVM probe kvm.py.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from factory.errors import InfrastructureError

# What the host keeps for itself (packer, the host-side install, page cache) while a VM runs.
HOST_RESERVED_MIB = 4096
VM_MIN_MEMORY_MIB = 2048


def _meminfo_mib() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) // 1024
    return values


def vm_memory_limit_mib(info: dict[str, int] | None = None) -> int:
    """The most memory a VM may get here: total memory less what the host keeps, and never
    more than is available now."""
    info = info or _meminfo_mib()
    available = info.get("MemAvailable", info["MemTotal"])
    return max(0, min(info["MemTotal"] - HOST_RESERVED_MIB, available - 1024))


@dataclass(frozen=True)
class VMSize:
    cpus: int
    memory_mib: int


def local_vm_size(cpus: int, memory_mib: int, requested_mib: int | None = None) -> VMSize:
    """A VM's size on this host: the profile's hardware capped to what the host can give.
    `requested_mib` is an explicit demand (resources.build_memory) that must fit as asked."""
    info = _meminfo_mib()
    limit, total = vm_memory_limit_mib(info), info["MemTotal"]
    if requested_mib is not None and requested_mib > limit:
        raise InfrastructureError(
            f"resources.build_memory: {requested_mib} MiB does not fit this host, which can "
            f"give a VM at most {limit} MiB (of {total} MiB); lower it or build on a bigger host"
        )
    if limit < VM_MIN_MEMORY_MIB:
        raise InfrastructureError(
            f"this host can give a VM {limit} MiB (of {total} MiB, less {HOST_RESERVED_MIB} "
            f"kept for the host) but the build needs {VM_MIN_MEMORY_MIB} MiB; free memory or "
            "build on a bigger host"
        )
    memory = requested_mib or min(max(memory_mib, VM_MIN_MEMORY_MIB), limit)
    return VMSize(cpus=max(1, min(cpus, os.cpu_count() or 1)), memory_mib=memory)
