"""CPU levels: the x86-64 micro-architecture level a profile promises (`cpu_baseline`), the QEMU
CPU model that boots at exactly that level, and the level a locked wheel needs.

The levels are the x86-64 psABI's (v1 to v4). The oldest CPU a client runs decides which wheels
can run at all, so the validator boots at the profile's level, never above it.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory.errors import ConflictError

LEVELS = ("x86-64-v1", "x86-64-v2", "x86-64-v3", "x86-64-v4")
DEFAULT_LEVEL = "x86-64-v2"
# QEMU 7.2 has no x86-64-vN models; these named models have exactly each level's features.
# qemu64 adds SSE3 to v1, which every x86-64 CPU since 2005 has.
QEMU_MODELS = {
    "x86-64-v1": "qemu64",
    "x86-64-v2": "Nehalem",
    "x86-64-v3": "Haswell-noTSX",
    "x86-64-v4": "Skylake-Server-noTSX-IBRS",
}
# TCG emulates up to v2 faithfully; QEMU 7.2's AVX2 emulation crashes NumPy's sort kernels.
TCG_FAITHFUL_LEVEL = "x86-64-v2"
# TCG cannot emulate IA32_ARCH_CAPABILITIES, so a guest kernel on an Intel model assumes
# Meltdown and isolates its page tables (PTI): every system call then flushes the emulated
# TLB. Client CPUs since 2019 report themselves unaffected, and AMD's never were. Under TCG
# the model keeps its level and takes AMD's vendor id, so the guest runs without PTI.
TCG_VENDOR_ID = "AuthenticAMD"
# /proc/cpuinfo flags each level adds to the one below it.
LEVEL_FLAGS = {
    "x86-64-v1": ("cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2"),
    "x86-64-v2": ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"),
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
# Flags that only a CPU at that level or above has (qemu64 already has some v2 flags).
_LEVEL_MARKERS = {
    "x86-64-v2": ("sse4_2", "popcnt"),
    "x86-64-v3": ("avx2", "fma"),
    "x86-64-v4": ("avx512f",),
}
# NumPy's names for the features of its baseline, by the level that provides them.
_NUMPY_FEATURE_LEVELS = {
    "SSE": "x86-64-v1",
    "SSE2": "x86-64-v1",
    "SSE3": "x86-64-v1",
    "SSSE3": "x86-64-v2",
    "SSE41": "x86-64-v2",
    "POPCNT": "x86-64-v2",
    "SSE42": "x86-64-v2",
    "X86_V2": "x86-64-v2",
    "AVX": "x86-64-v3",
    "F16C": "x86-64-v3",
    "FMA3": "x86-64-v3",
    "AVX2": "x86-64-v3",
    "X86_V3": "x86-64-v3",
}
_NUMPY_BASELINE = re.compile(rb"built with baseline optimizations:\s*\(([A-Z0-9_ ]*)\)")
# Packages whose wheels state their own baseline, and where it is written.
_STATED_BASELINE_MEMBERS = {"numpy": re.compile(r"(^|/)_multiarray_umath[^/]*\.so$")}


def level_index(level: str) -> int:
    return LEVELS.index(level)


def lower_level(a: str, b: str) -> str:
    return a if level_index(a) <= level_index(b) else b


@dataclass(frozen=True)
class CpuChoice:
    """The CPU a VM boots with: its QEMU model and the level that boot proves."""

    model: str
    level: str
    promised: str
    accelerator: str

    @property
    def vendor_id(self) -> str | None:
        """The vendor id the guest sees, where it is not the model's own."""
        return TCG_VENDOR_ID if self.accelerator == "tcg" else None

    @property
    def qemu_cpu(self) -> str:
        """The value of QEMU's -cpu option."""
        return qemu_cpu_option(self.model, self.vendor_id)

    @property
    def proves_promise(self) -> bool:
        return self.level == self.promised

    def describe(self) -> str:
        vendor = f", vendor id {self.vendor_id}" if self.vendor_id else ""
        return f"{self.model} ({self.level}, {self.accelerator}{vendor})"


def qemu_cpu_option(model: str, vendor_id: str | None) -> str:
    return f"{model},vendor={vendor_id}" if vendor_id else model


def validation_cpu(promised: str, accelerator: str) -> CpuChoice:
    """Boot at exactly the promised level; under TCG, at most at the faithful level."""
    level = promised if accelerator == "kvm" else lower_level(promised, TCG_FAITHFUL_LEVEL)
    return CpuChoice(QEMU_MODELS[level], level, promised, accelerator)


def build_cpu_model(accelerator: str) -> str:
    """The build VM's CPU: the host's under KVM, the highest faithful model under TCG. The
    build runs only system tools, never the client's code."""
    if accelerator == "kvm":
        return "host"
    return qemu_cpu_option(QEMU_MODELS[TCG_FAITHFUL_LEVEL], TCG_VENDOR_ID)


def level_of_features(features: list[str]) -> str:
    """The lowest level that has every one of NumPy's baseline features."""
    level = LEVELS[0]
    for feature in features:
        needed = _NUMPY_FEATURE_LEVELS.get(feature)
        if needed is None:  # AVX512_*, X86_V4 and anything newer
            needed = "x86-64-v4"
        if level_index(needed) > level_index(level):
            level = needed
    return level


def wheel_baseline(package: str, wheel: Path) -> list[str] | None:
    """The baseline features a wheel states for itself, or None where it states none."""
    member_pattern = _STATED_BASELINE_MEMBERS.get(package)
    if member_pattern is None:
        return None
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member_pattern.search(member):
                match = _NUMPY_BASELINE.search(archive.read(member))
                if match:
                    return match.group(1).decode().split()
    return None


def states_baseline(package: str) -> bool:
    return package in _STATED_BASELINE_MEMBERS


def baseline_problem(
    env_name: str, package: str, version: str, wheel: Path, promised: str
) -> str | None:
    """One line when the wheel needs a higher level than the profile's cpu_baseline."""
    features = wheel_baseline(package, wheel)
    if not features:
        return None
    needed = level_of_features(features)
    if level_index(needed) <= level_index(promised):
        return None
    return (
        f"environment '{env_name}': {package} {version} needs an {needed} CPU (its wheel's "
        f"baseline is {' '.join(features)}), but cpu_baseline is {promised}; raise "
        f"cpu_baseline to {needed} or pin an older {package} that runs on {promised}"
    )


def guest_level_problem(flags: set[str], level: str, exact: bool) -> str | None:
    """Whether a CPU with these /proc/cpuinfo flags is at `level` (exactly, for a VM we boot)."""
    missing = [f for lvl in LEVELS[: level_index(level) + 1] for f in LEVEL_FLAGS[lvl]]
    missing = [flag for flag in missing if flag not in flags]
    if missing:
        return f"lacks {' '.join(missing)}, which {level} has"
    if exact and level != LEVELS[-1]:
        above = LEVELS[level_index(level) + 1]
        extra = [flag for flag in _LEVEL_MARKERS[above] if flag in flags]
        if extra:
            return f"has {' '.join(extra)} ({above}); the boot does not hold the CPU at {level}"
    return None


def check_locked_baselines(
    promised: str,
    locks: dict,
    fetch_wheel: Callable[[str, str], Path],
) -> None:
    """Refuse a locked wheel whose stated baseline is above `promised`. `fetch_wheel(url,
    sha256)` returns the wheel (cached)."""
    for lock in locks.values():
        for package in lock.pip:
            if not states_baseline(package.name) or not package.url.endswith(".whl"):
                continue
            wheel = fetch_wheel(package.url, package.sha256)
            problem = baseline_problem(lock.name, package.name, package.version, wheel, promised)
            if problem:
                raise ConflictError(problem)
