"""The GPU path on a machine without a GPU: the Debian GPU base layer, whose DKMS module must be
built for the image's own kernel, and (in `make test-gpu`) the GPU image built and validated
with level 1 passing and level 2 reported as skipped."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from factory import base
from factory.pipeline import gpu_base_packages
from factory.profile import load_profile
from tests.conftest import REPO, require_root, run_factory
from tests.image_edit import mounted_root, raw_copy

GPU_PROFILE = REPO / "profiles" / "demo-gpu.yaml"


@pytest.fixture(scope="module")
def gpu_base():
    require_root()
    packages = gpu_base_packages(load_profile(GPU_PROFILE))
    return base.debian_base_image(
        log=lambda line: print(line, file=sys.stderr), extra_packages=packages
    )


@pytest.mark.e2e
def test_gpu_base_layer_has_the_module_for_its_own_kernel(gpu_base, tmp_path):
    """DKMS built nvidia-current for the kernel in the image's /boot (not the host's)."""
    raw = raw_copy(gpu_base, tmp_path / "gpu-base.raw")
    with mounted_root(raw) as root:
        kernels = [p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*")]
        assert kernels
        for kernel in kernels:
            # The image's own modinfo, on the image's own module tree.
            vermagic = subprocess.run(
                ["chroot", str(root), "modinfo", "-k", kernel, "-F", "vermagic", "nvidia-current"],
                capture_output=True,
                text=True,
            )
            assert vermagic.returncode == 0, f"no nvidia-current module for {kernel}"
            assert vermagic.stdout.split()[0] == kernel
        # nvidia-smi is an alternatives link: resolve it inside the image.
        assert (
            subprocess.run(["chroot", str(root), "test", "-x", "/usr/bin/nvidia-smi"]).returncode
            == 0
        )
        status = (root / "var/lib/dpkg/status").read_text()
        assert re.search(r"Package: nvidia-kernel-dkms\nStatus: install ok installed", status)
    raw.unlink()


@pytest.mark.gpu_build
def test_gpu_image_builds_and_validates_level1_and_skips_level2(tmp_path):
    result = run_factory("build", str(GPU_PROFILE), "--outputs", str(tmp_path), timeout=7200)
    assert result.returncode == 0, result.stderr[-3000:]
    delivery = tmp_path / "demo_hello_gpu_v1"
    result = run_factory("validate", str(delivery), timeout=3600)
    print(result.stdout, file=sys.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    checks = {c["name"]: c for c in json.loads((delivery / "report.json").read_text())["checks"]}
    for name in (
        "gpu: driver 535 is installed",
        "gpu: kernel module built for the booted kernel",
        "gpu: nvidia-smi is present",
    ):
        assert checks[name]["status"] == "passed", checks[name]
    level2 = checks["gpu: nvidia-smi lists the device"]
    assert level2["status"] == "skipped" and level2["detail"] == "skipped: no GPU on this machine"


HOSPITAL_PROFILE = REPO / "profiles" / "hospital_lung_nodule_v1.yaml"


def test_live_host_gpu_checks_run_on_this_machine(tmp_path):
    """`factory validate --host local --only gpu` runs the GPU checks on the machine itself, as
    IT does on a client's GPU server. Here there is no driver and no GPU: level 1 fails and
    level 2 is reported as skipped, never as passed."""
    if list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has an NVIDIA GPU; the lent-machine run covers that case")
    result = run_factory(
        "validate", "--host", "local", "--profile", str(HOSPITAL_PROFILE),
        "--only", "gpu", "--report-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 5, result.stdout + result.stderr  # validation failed
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: validation failed")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["subject"]["target"].endswith("@localhost (no SSH)")
    checks = {c["name"]: c for c in report["checks"]}
    assert {c["group"] for c in checks.values()} == {"gpu:level1", "gpu:level2"}
    assert checks["gpu: driver 535 is installed"]["status"] == "failed"
    level2 = [c for c in checks.values() if c["group"] == "gpu:level2"]
    assert [c["name"] for c in level2] == [
        "gpu: nvidia-smi lists the device",
        "gpu: torch.cuda.is_available() in lung-nodule",
    ]
    for check in level2:
        assert check["status"] == "skipped" and check["detail"] == "skipped: no GPU on this machine"
    assert (tmp_path / "report.xml").exists() and (tmp_path / "report.html").exists()


def test_unknown_check_group_is_one_line_error(tmp_path):
    result = run_factory(
        "validate", "--host", "local", "--profile", str(HOSPITAL_PROFILE),
        "--only", "gpu,gpus", "--report-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--only: unknown group(s) gpus" in lines[0], result.stderr
    assert not list(tmp_path.iterdir())
