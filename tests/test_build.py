"""Build orchestration pieces that run without a VM: progress parsing, the build lock,
publishing, and refusing to overwrite a delivery."""

import multiprocessing
import os
import re
import time
from pathlib import Path

import pytest

from factory.build import _packer_message, _step_of
from factory.delivery import Delivery, build_lock, keep_private, publish
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
    publish(Delivery(staging / "delivery", "demo_hello_v1"), Delivery(final, "demo_hello_v1"))
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
        assert result.returncode == 6  # infrastructure: another host may have the room
        assert "needs about 5.0 GiB (its image twice" in result.stderr
        assert [p.name for p in small.iterdir() if not p.name.startswith(".")] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def installer_profile(tmp_path: Path, conda: str) -> Path:
    """The demo profile with another conda installer; notebooks and channel made absolute."""
    text = DEMO_PROFILE.read_text()
    text = text.replace(
        "../outputs/channels/demo", str(DEMO_PROFILE.parent.parent / "outputs/channels/demo")
    )
    text = text.replace(
        "notebooks/demo-credit-score.ipynb",
        str(DEMO_PROFILE.parent / "notebooks/demo-credit-score.ipynb"),
    )
    text = text.replace("services/credit_", str(DEMO_PROFILE.parent / "services/credit_"))
    path = tmp_path / "installer.yaml"
    path.write_text(text + f"conda: {conda}\n")
    return path


@pytest.mark.parametrize("installer", ["miniconda", "miniforge"])
def test_conda_installer_is_checked_before_anything_boots(installer, tmp_path, demo_channel):
    """No conda installer can be downloaded here, so the build stops in pre-flight: a wrong
    checksum and a missing file each give one line, and nothing is built or published."""
    fake = tmp_path / "Miniforge3-Linux-x86_64.sh"
    fake.write_text("#!/bin/sh\nexit 1\n")
    outputs = tmp_path / "outputs"
    pinned = "0" * 64
    for url, message in (
        (fake.as_uri(), f"conda.sha256: {fake.name} has sha256 "),
        ((tmp_path / "missing.sh").as_uri(), "conda.url: cannot download"),
    ):
        profile = installer_profile(
            tmp_path, f"{{installer: {installer}, url: '{url}', sha256: '{pinned}'}}"
        )
        started = time.monotonic()
        result = run_factory("build", str(profile), "--outputs", str(outputs))
        assert result.returncode == 1, result.stderr
        assert message in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert time.monotonic() - started < 60
        assert [p.name for p in outputs.iterdir() if not p.name.startswith(".")] == []
        assert not list(outputs.glob(".staging-*"))


def test_miniforge_renders_and_its_conda_path_is_in_the_payload(tmp_path, demo_channel):
    from factory.bundle import local_explicit_text
    from factory.profile import load_profile
    from factory.resolve import lock_profile

    profile = installer_profile(
        tmp_path,
        "{installer: miniforge, url: 'file:///srv/Miniforge3.sh', sha256: '" + "a" * 64 + "'}",
    )
    result = run_factory("render", str(profile), "--outputs", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    settings = (
        tmp_path / "out" / "renders" / "demo_hello_v1" / "payload" / "settings.sh"
    ).read_text()
    assert "INSTALLER=miniforge" in settings
    lock = lock_profile(load_profile(profile), log=lambda _: None)["demo"]
    text = local_explicit_text(lock, "/tmp/factory-payload/channel")
    lines = [line for line in text.splitlines() if line.startswith("file://")]
    assert len(lines) == len(lock.conda)
    for line, package in zip(lines, lock.conda, strict=True):
        assert line.endswith(f"/{package.file_name}#{package.md5}")
        assert line.startswith("file:///tmp/factory-payload/channel/")


def test_build_refuses_a_build_vm_larger_than_the_host(tmp_path, demo_channel):
    """A profile that demands more build memory than this host can give stops in pre-flight
    with one line naming what the host has and what was asked; nothing is built."""
    from factory import host

    total = host._meminfo_mib()["MemTotal"]
    profile = installer_profile(tmp_path, "{installer: rattler}")
    text = profile.read_text().replace("disk: 8\n", "disk: 8\n  build_memory: 1048576\n")
    profile.write_text(text)
    outputs = tmp_path / "outputs"
    started = time.monotonic()
    result = run_factory("build", str(profile), "--outputs", str(outputs))
    assert result.returncode == 6  # infrastructure
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # What the host can give follows the memory available at that moment, which other tests'
    # VMs change: the line is checked by its shape and the figure by its bounds.
    said = re.fullmatch(
        r"error: resources\.build_memory: 1048576 MiB does not fit this host, which can give a "
        rf"VM at most (\d+) MiB \(of {total} MiB\); lower it or build on a bigger host",
        errors[0] if len(errors) == 1 else "",
    )
    assert said, result.stderr
    assert 0 < int(said[1]) <= total - host.HOST_RESERVED_MIB
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
    assert [p.name for p in outputs.iterdir() if not p.name.startswith(".")] == []


def test_render_before_build_does_not_make_the_build_refuse(tmp_path, demo_channel):
    """A render leaves outputs/<name>/ alone, so the build that follows gets past the
    existing-delivery check (and stops, here, at the next pre-flight: a build VM too large)."""
    profile = installer_profile(tmp_path, "{installer: rattler}")
    outputs = tmp_path / "outputs"
    rendered = run_factory("render", str(profile), "--outputs", str(outputs))
    assert rendered.returncode == 0, rendered.stderr
    profile.write_text(
        profile.read_text().replace("disk: 8\n", "disk: 8\n  build_memory: 1048576\n")
    )
    result = run_factory("build", str(profile), "--outputs", str(outputs))
    assert result.returncode == 6
    assert "already holds a delivery" not in result.stderr
    assert "resources.build_memory: 1048576 MiB does not fit this host" in result.stderr
    assert not (outputs / "demo_hello_v1").exists()


def test_build_vm_is_capped_to_the_host_and_keeps_the_delivered_hardware():
    from factory import host

    vm = host.local_vm_size(cpus=64, memory_mib=1 << 20)
    assert vm.memory_mib == host.vm_memory_limit_mib() and vm.cpus <= (os.cpu_count() or 1)
    small = host.local_vm_size(cpus=1, memory_mib=512)
    assert (small.cpus, small.memory_mib) == (1, host.VM_MIN_MEMORY_MIB)


def test_a_delivery_that_carries_a_client_key_is_private_to_its_owner(tmp_path):
    staged = Delivery(tmp_path / ".staging" / "delivery", "x")
    staged.path.mkdir(parents=True)
    disks = staged.artifacts
    for disk in disks:
        disk.write_bytes(b"disk")
    keep_private(staged)
    publish(staged, Delivery(tmp_path / "x", "x"))
    published = tmp_path / "x"
    assert published.stat().st_mode & 0o777 == 0o700
    assert {(published / d.name).stat().st_mode & 0o777 for d in disks} == {0o600}


def test_the_build_lock_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / ".demo_hello_v1.lock").symlink_to(victim)
    with pytest.raises(FactoryError, match="remove it if it is a link"):
        with build_lock(tmp_path, "demo_hello_v1"):
            pass
    assert victim.read_text() == "keep\n"


def test_lock_check_and_a_locked_build_refuse_a_stale_lock(tmp_path, test_channel):
    """`factory lock --check` exits 1 when a lock no longer matches its profile, and
    `factory build --locked` refuses to solve again: one line each, nothing built."""
    from tests.test_resolve import profile_with

    profile = profile_with(tmp_path, test_channel, "[six]")
    outputs = tmp_path / "outputs"
    check = run_factory("lock", str(profile), "--check")
    assert check.returncode == 1 and "run `factory lock" in check.stderr
    run_factory("lock", str(profile), check=True)
    assert run_factory("lock", str(profile), "--check").returncode == 0
    profile.write_text(profile.read_text().replace("conda: [six]", "conda: [six, pip]"))
    check = run_factory("lock", str(profile), "--check")
    assert check.returncode == 1
    assert check.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'p.lock'}: the lock of model no longer matches p.yaml; "
        f"run `factory lock {profile}`"
    ]
    build = run_factory("build", str(profile), "--locked", "--outputs", str(outputs))
    assert build.returncode == 1, build.stderr
    assert "the lock of 'model' is missing or no longer matches p.yaml" in build.stderr
    assert "Traceback" not in build.stderr
    assert not (outputs / "acme_locks_v1").exists()
