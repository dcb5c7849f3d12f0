"""Which NVIDIA driver, CUDA and framework versions go together.

Facts from NVIDIA's CUDA release notes (the minimum driver of each toolkit release) and the
frameworks' published builds. The profile is refused before anything is built when they
do not fit.
"""

from __future__ import annotations

# CUDA release -> the oldest driver branch that supports it.
CUDA_MIN_DRIVER = {
    "11.8": 520,
    "12.0": 525,
    "12.1": 530,
    "12.2": 535,
    "12.3": 545,
    "12.4": 550,
    "12.5": 555,
    "12.6": 560,
    "12.8": 570,
    "12.9": 575,
    "13.0": 580,
}
# PyTorch minor release -> the CUDA releases it is built for.
PYTORCH_CUDA = {
    "2.1": ["11.8", "12.1"],
    "2.2": ["11.8", "12.1"],
    "2.3": ["11.8", "12.1"],
    "2.4": ["11.8", "12.1", "12.4"],
    "2.5": ["11.8", "12.1", "12.4"],
    "2.6": ["11.8", "12.4", "12.6"],
    "2.7": ["11.8", "12.6", "12.8"],
}
# TensorFlow minor release -> the CUDA release its pip wheels are built against.
TENSORFLOW_CUDA = {
    "2.14": ["11.8"],
    "2.15": ["12.2"],
    "2.16": ["12.3"],
    "2.17": ["12.3"],
    "2.18": ["12.5"],
}
FRAMEWORK_CUDA = {"pytorch": PYTORCH_CUDA, "tensorflow": TENSORFLOW_CUDA}
# What each base OS's archive ships.
DEBIAN_12_DRIVER = "535"
DEBIAN_12_TOOLKIT = "11.8"
# pip distributions whose version names the CUDA runtime a framework wheel was built for.
CUDA_RUNTIME_WHEELS = ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu11")
# Packages of the Debian 12 GPU base layer: the DKMS module is built for the image's kernel
# when the base is made, before any kernel change.
DEBIAN_GPU_PACKAGES = ("linux-headers-amd64", "nvidia-kernel-dkms", "nvidia-smi")


def minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def driver_problem(driver: str, cuda: str) -> str | None:
    """Why this driver branch cannot run this CUDA, or None."""
    needed = CUDA_MIN_DRIVER.get(minor(cuda))
    if needed is None:
        known = ", ".join(CUDA_MIN_DRIVER)
        return f"gpu.cuda: unknown CUDA release {cuda}; use one of {known}"
    if int(driver) < needed:
        newest = max(
            (c for c, d in CUDA_MIN_DRIVER.items() if d <= int(driver)),
            key=lambda c: tuple(map(int, c.split("."))),
            default=None,
        )
        hint = f"driver {driver} supports CUDA up to {newest}" if newest else ""
        return (
            f"gpu.cuda: CUDA {cuda} needs driver branch {needed} or newer; {hint}; "
            f"set gpu.driver to '{needed}' or gpu.cuda to '{newest}'"
        )
    return None


def framework_problem(framework: str, version: str, cuda: str) -> str | None:
    """Why this framework release has no build for this CUDA, or None."""
    builds = FRAMEWORK_CUDA[framework].get(minor(version))
    if builds is None:
        known = ", ".join(FRAMEWORK_CUDA[framework])
        return f"gpu.frameworks.{framework}: unknown release {version}; use one of {known}"
    if minor(cuda) not in builds:
        fitting = [v for v, b in FRAMEWORK_CUDA[framework].items() if minor(cuda) in b]
        return (
            f"gpu.frameworks.{framework}: {framework} {version} is built for CUDA "
            f"{', '.join(builds)}, not {cuda}; choose CUDA {' or '.join(builds)}"
            + (f", or {framework} {' / '.join(fitting)}" if fitting else "")
        )
    return None


def locked_cuda_runtime(pip_packages: list[tuple[str, str]]) -> str | None:
    """The CUDA release a locked environment's framework wheels were built for, read from
    the nvidia-cuda-runtime wheel the resolver picked."""
    for name, version in pip_packages:
        if name in CUDA_RUNTIME_WHEELS:
            return minor(version)
    return None
