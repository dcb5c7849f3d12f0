"""GPU checks in two levels. Level 1 holds on any machine: the driver is installed, its module
is built for the booted kernel, nvidia-smi is there, the toolkit matches. Level 2 needs an
NVIDIA device; without one it is reported as skipped, never as passed."""

from __future__ import annotations

import json

from factory.image_layout import CONDA_ENVS
from factory.profile import package_name
from factory.validate.context import SKIPPED, CheckContext, CheckResult, quote, result

NVIDIA_VENDOR = "0x10de"
CUDA_PROBE = r"""
import json, torch
out = {"available": torch.cuda.is_available(), "cuda": torch.version.cuda}
if out["available"]:
    a = torch.rand(512, 512, device="cuda")
    out["matmul"] = float((a @ a).sum().item())
    out["device"] = torch.cuda.get_device_name(0)
print(json.dumps(out))
"""


def nvidia_devices(ctx: CheckContext) -> int:
    """NVIDIA PCI functions, or the driver's device nodes where /sys hides the bus
    (containers and micro-VMs that pass the GPU through)."""
    found = ctx.target.run(
        f"grep -lx {NVIDIA_VENDOR} /sys/bus/pci/devices/*/vendor 2>/dev/null"
        " || ls /dev/nvidia[0-9]* 2>/dev/null"
    ).stdout
    return len(found.split())


def check_gpu_level1(ctx: CheckContext) -> list[CheckResult]:
    target = ctx.loaded.profile.gpu
    if target is None:
        return []
    group = "gpu:level1"
    run = ctx.target.run
    packages = run(
        "dpkg-query -W -f='${Package} ${Version} ${Status}\\n' 'nvidia-kernel-dkms' "
        "'nvidia-dkms-*' 'linux-modules-nvidia-*' 2>/dev/null | grep 'install ok installed'"
    ).stdout.split("\n")[0]
    version = packages.split()[1] if packages else ""
    results = [
        result(
            f"gpu: driver {target.driver} is installed",
            version.startswith(target.driver + ".") or f"-{target.driver}" in packages,
            packages.rsplit(" install", 1)[0] if packages else "no NVIDIA driver package",
            group,
        )
    ]
    kernel = run("uname -r").stdout.strip()
    # modinfo and dkms live in /usr/sbin, outside an ordinary user's PATH.
    vermagic = run(
        "PATH=/usr/sbin:/sbin:$PATH; modinfo -F vermagic nvidia-current 2>/dev/null "
        "|| modinfo -F vermagic nvidia"
    ).stdout.strip()
    dkms = run("sudo /usr/sbin/dkms status 2>/dev/null").stdout.strip()
    results.append(
        result(
            "gpu: kernel module built for the booted kernel",
            vermagic.split(" ")[0] == kernel and (not dkms or kernel in dkms),
            f"booted {kernel}; module vermagic {vermagic or 'none'}; dkms: "
            + ("; ".join(dkms.splitlines()) or "not used"),
            group,
        )
    )
    smi = run("command -v nvidia-smi").stdout.strip()
    results.append(result("gpu: nvidia-smi is present", bool(smi), smi or "not found", group))
    if target.toolkit:
        nvcc = run("nvcc --version | grep -o 'release [0-9.]*'").stdout.strip()
        results.append(
            result(
                f"gpu: CUDA toolkit {target.cuda}",
                nvcc == f"release {target.cuda}",
                nvcc or "nvcc not found",
                group,
            )
        )
    return results


def check_gpu_level2(ctx: CheckContext) -> list[CheckResult]:
    target = ctx.loaded.profile.gpu
    if target is None:
        return []
    group = "gpu:level2"
    torch_envs = [
        env.name
        for env in ctx.loaded.profile.environments
        if {"torch", "pytorch"} & {package_name(s) for s in [*env.conda, *env.pip]}
    ]
    names = ["gpu: nvidia-smi lists the device"]
    names += [f"gpu: torch.cuda.is_available() in {env}" for env in torch_envs]
    if not nvidia_devices(ctx):
        return [
            CheckResult(n, SKIPPED, "skipped: no GPU on this machine", group=group) for n in names
        ]
    listed = ctx.target.run("nvidia-smi -L")
    results = [
        result(
            names[0],
            listed.ok and "GPU 0" in listed.stdout,
            listed.stdout.strip()[:300] or listed.stderr.strip()[-300:],
            group,
        )
    ]
    for env, name in zip(torch_envs, names[1:], strict=True):
        probe = ctx.target.run(f"{CONDA_ENVS}/{env}/bin/python -c {quote(CUDA_PROBE)}")
        try:
            data = json.loads(probe.stdout)
        except json.JSONDecodeError:
            data = {"available": False, "error": probe.stderr.strip()[-300:]}
        results.append(
            result(
                name,
                bool(data.get("available")) and "matmul" in data,
                json.dumps(data),
                group,
            )
        )
    return results
