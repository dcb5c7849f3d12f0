"""seal.sh for real, in a throwaway root: the host's /usr (read-only) under a made-up image
with the build's leftovers planted. Only systemctl and cloud-init, which need a booted
system, are scripts that record their calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from factory import image_layout
from factory.escape import shell_assignments
from factory.resources import PROVISIONERS_DIR

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare (a private mount namespace and chroot)",
)

LEFTOVERS = [
    "etc/ssh/ssh_host_ed25519_key",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/crash/_usr_bin_python3.0.crash",
    "var/lib/systemd/coredump/core.python3.0.zst",
    "root/.bash_history",
    "root/.python_history",
    "root/.cache/pip/http/secret",
    "root/.conda/environments.txt",
    "home/analyst/jupyter-token",
    "etc/factory/jupyter.env",
    "etc/sudoers.d/90-cloud-init-users",
    "tmp/.hidden-build-file",
    "tmp/visible",
    "var/tmp/.hidden",
    "var/log/syslog.1",
    "var/log/journal/0123/system.journal",
    "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease",
]
FAKE_TOOL = '#!/bin/sh\necho "$(basename "$0") $*" >> /calls.log\nexit {code}\n'


def make_image(root: Path, cloud_init_exit: int = 0) -> None:
    for relative in LEFTOVERS:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("secret\n")
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        (root / link).symlink_to(target)
    (root / "lib64").symlink_to("usr/lib64")
    (root / "usr").mkdir()
    (root / "dev").mkdir()
    (root / "dev/null").touch()
    (root / "etc/factory/settings.sh").write_text(
        shell_assignments(
            {"ADMIN_USER": "analyst", "BUILD_USER": "factory-build", **image_layout.settings()}
        )
    )
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/log/syslog").write_text("build output\n")
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)
    (root / "etc/apt/apt.conf.d").mkdir(parents=True)
    (root / "home/factory-build/.ssh").mkdir(parents=True)
    (root / "home/factory-build/.ssh/authorized_keys").write_text("ssh-ed25519 AAAA build\n")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "analyst:x:1000:1000::/home/analyst:/bin/bash\n"
        "factory-build:x:1001:1001::/home/factory-build:/bin/bash\n"
    )
    (root / "etc/group").write_text("root:x:0:\nanalyst:x:1000:\nfactory-build:x:1001:\n")
    (root / "etc/shadow").write_text("root:*:1::::::\nanalyst:!:1::::::\nfactory-build:!:1::::::\n")
    (root / "etc/gshadow").write_text("root:*::\nanalyst:!::\nfactory-build:!::\n")
    payload = root / "tmp/factory-payload"
    payload.mkdir(parents=True)
    shutil.copy2(PROVISIONERS_DIR / "seal.sh", payload / "seal.sh")
    fakes = root / "fakebin"
    fakes.mkdir()
    for tool, code in (("systemctl", 0), ("cloud-init", cloud_init_exit)):
        (fakes / tool).write_text(FAKE_TOOL.format(code=code))
        (fakes / tool).chmod(0o755)


def run_seal(root: Path) -> subprocess.CompletedProcess:
    script = (
        f"mount --bind /usr {root}/usr && mount -o remount,bind,ro {root}/usr && "
        f"mount --bind /dev/null {root}/dev/null && "
        f"exec chroot {root} /usr/bin/env -i PATH=/fakebin:/usr/sbin:/usr/bin "
        "bash /tmp/factory-payload/seal.sh"
    )
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120
    )


def test_seal_removes_every_build_leftover_then_powers_off(tmp_path):
    root = tmp_path / "image"
    make_image(root)
    result = run_seal(root)
    assert result.returncode == 0, result.stderr
    left = [relative for relative in LEFTOVERS if (root / relative).exists()]
    assert left == []
    assert list((root / "tmp").iterdir()) == [] and list((root / "var/tmp").iterdir()) == []
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "var/log/syslog").read_text() == ""
    assert "factory-build" not in (root / "etc/passwd").read_text()
    assert not (root / "home/factory-build").exists()
    assert (root / "home/analyst").is_dir()
    calls = (root / "calls.log").read_text().splitlines()
    assert "cloud-init clean --logs --seed" in calls
    assert calls[-1] == "systemctl poweroff --no-block"


def test_a_failing_seal_step_is_loud_and_never_powers_off(tmp_path):
    """A step that fails stops the seal with its line in the build log, and the VM stays up:
    packer then fails the build instead of exporting a half-sealed image."""
    root = tmp_path / "image"
    make_image(root, cloud_init_exit=3)
    result = run_seal(root)
    assert result.returncode == 3
    assert "seal: failed at line" in result.stderr and "cloud-init clean" in result.stderr
    calls = (root / "calls.log").read_text().splitlines()
    assert "systemctl poweroff --no-block" not in calls
