"""Build orchestration pieces that run without a VM: progress parsing, the build lock,
publishing, and refusing to overwrite a delivery."""

import multiprocessing
import time
from pathlib import Path

import pytest

from factory.build import _packer_message, _step_of, build_lock, publish
from factory.errors import FactoryError
from tests.conftest import DEMO_PROFILE, run_factory


def test_machine_readable_lines_become_steps():
    line = "1700000000,qemu,ui,say,==> qemu: Waiting for SSH to become available...\n"
    assert _step_of(_packer_message(line)) == "booting the base image (waiting for SSH)"
    line = "1700000000,qemu,ui,message,    qemu: factory-step: conda environment demo\n"
    assert _step_of(_packer_message(line)) == "conda environment demo"
    assert _packer_message("1700000000,,ui,message,a%!(PACKER_COMMA) b") == "a, b"
    assert _packer_message("1700000000,qemu,artifact-count,1") is None


def _hold_lock(outputs: str, ready, release) -> None:
    with build_lock(Path(outputs), "demo_hello_v1"):
        ready.set()
        release.wait(10)


def test_second_build_of_same_name_refuses(tmp_path):
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(FactoryError, match="another build of demo_hello_v1 is running"):
            with build_lock(tmp_path, "demo_hello_v1"):
                pass
        with build_lock(tmp_path, "other_profile_v1"):
            pass  # a different profile builds side by side
    finally:
        release.set()
        holder.join()
    with build_lock(tmp_path, "demo_hello_v1"):
        pass


def test_publish_replaces_only_after_success(tmp_path):
    final = tmp_path / "demo_hello_v1"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = tmp_path / ".staging"
    (staging / "delivery").mkdir(parents=True)
    (staging / "delivery" / "new.txt").write_text("new")
    publish(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".replaced")] == []


def test_existing_delivery_is_not_overwritten_without_force(tmp_path):
    (tmp_path / "demo_hello_v1").mkdir()
    (tmp_path / "demo_hello_v1" / "demo_hello_v1.ova").write_text("delivered")
    started = time.monotonic()
    result = run_factory("build", str(DEMO_PROFILE), "--outputs", str(tmp_path))
    assert result.returncode == 1
    assert "already holds a delivery" in result.stderr
    assert time.monotonic() - started < 30
    assert (tmp_path / "demo_hello_v1" / "demo_hello_v1.ova").read_text() == "delivered"


def test_build_refuses_when_disk_is_too_small(tmp_path):
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        result = run_factory("build", str(DEMO_PROFILE), "--outputs", str(small))
        assert result.returncode == 1
        assert "needs about 10 GiB" in result.stderr
        assert [p.name for p in small.iterdir() if not p.name.startswith(".")] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
