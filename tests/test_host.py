"""Real checks of the build host and the KVM boot probe (no mocks: QEMU really runs)."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from factory import cache, doctor, kvm, tools
from factory.errors import ToolError


@pytest.fixture(scope="module", autouse=True)
def probe_cache(tmp_path_factory):
    """One fresh cache directory for this module (the probe kernel is fetched at most once)."""
    previous = cache._override
    cache.set_cache_dir(tmp_path_factory.mktemp("factory-cache"))
    yield cache.cache_dir()
    cache._override = previous


def _qemu_children() -> list[str]:
    """QEMU processes (zombies included) whose parent is this test process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if comm.startswith("qemu-system") and int(fields[1]) == os.getpid():
            found.append(f"{stat.parent.name} {comm} state={fields[0]}")
    return found


def _has_hardware_virt() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.MULTILINE))


def test_check_host_finds_packer_and_qemu_with_versions():
    checks = {check.name: check for check in doctor.check_host()}
    for name in ("packer", "qemu-system-x86_64", "qemu-img"):
        assert checks[name].ok, checks[name]
        assert checks[name].required
        assert checks[name].fix is None
        assert re.search(r"\d+\.\d+", checks[name].detail), checks[name].detail
    # doctor lists the one tool table, then root and KVM.
    assert list(checks) == [*tools.TOOLS, "root", "kvm"]
    assert not checks["kvm"].required
    for check in checks.values():
        if check.ok:
            assert check.fix is None, check
        elif check.name not in ("kvm", "root"):
            assert check.fix and check.fix.startswith("apt-get install -y "), check


def test_packer_version_is_a_triple():
    version = tools.packer_version()
    assert version is not None
    assert len(version) == 3 and all(isinstance(part, int) for part in version)


def test_explicit_accelerators_are_honoured():
    assert kvm.choose_accelerator("tcg") == "tcg"
    assert kvm.choose_accelerator("kvm") == "kvm"


@pytest.mark.parametrize("bad", ["", "KVM", "hvf", "xen"])
def test_bad_accelerator_names_the_option_and_the_choices(bad):
    with pytest.raises(ToolError) as info:
        kvm.choose_accelerator(bad)
    message = str(info.value)
    assert "--accelerator" in message
    for valid in ("auto", "kvm", "tcg"):
        assert valid in message


def test_qemu_accel_args():
    assert kvm.qemu_accel_args("kvm") == ["-accel", "kvm", "-cpu", "host"]
    assert kvm.qemu_accel_args("tcg") == ["-accel", "tcg,thread=multi"]
    with pytest.raises(ToolError):
        kvm.qemu_accel_args("auto")


def test_probe_kernel_is_a_readable_file():
    kernel, source = kvm.probe_kernel()
    assert kernel.is_file() and kernel.stat().st_size > 1_000_000
    assert source


def test_kvm_probe_runs_for_real_and_is_cached(probe_cache):
    started = time.monotonic()
    result = kvm.kvm_boots(refresh=True)
    assert isinstance(result, bool)
    if not _has_hardware_virt():
        # This CI kind: /dev/kvm exists (kvm_pvm) but no guest can boot under it.
        assert result is False
    assert time.monotonic() - started < 60
    assert not _qemu_children()

    if os.access(kvm.KVM_DEVICE, os.R_OK | os.W_OK):
        files = list((probe_cache / "probes").glob("kvm-*.json"))
        assert len(files) == 1
        evidence = json.loads(files[0].read_text())
        assert evidence["booted"] is result
        assert evidence["accel"] == "kvm"
        fields = ("exit_code", "console_tail", "panic_line", "seconds", "command", "kernel")
        for field in fields:
            assert field in evidence
        assert "-accel" in evidence["command"] and "kvm" in evidence["command"]

        started = time.monotonic()
        again = kvm.kvm_probe()
        assert time.monotonic() - started < 1.0
        assert again["cached"] is True
        assert again["booted"] is result
        assert kvm.choose_accelerator("auto") == ("kvm" if result else "tcg")


def test_the_same_probe_boots_to_the_panic_under_tcg(probe_cache):
    evidence = kvm.kvm_probe(refresh=True, timeout=120, _accel="tcg")
    assert evidence["booted"] is True, evidence
    assert evidence["cached"] is False
    assert not evidence["timed_out"]
    assert "Kernel panic" in evidence["panic_line"]
    assert "Unable to mount root fs" in evidence["panic_line"]
    assert evidence["console_tail"]
    assert (probe_cache / "probes" / Path(evidence["cache_file"]).name).is_file()
    assert not _qemu_children()
    assert kvm.kvm_boots(_accel="tcg") is True


def test_a_hung_guest_is_killed_after_the_timeout():
    kernel, _ = kvm.probe_kernel()
    started = time.monotonic()
    evidence = kvm._boot(kernel, "tcg", timeout=0.5)
    assert time.monotonic() - started < 10
    assert evidence["booted"] is False
    assert evidence["timed_out"] is True
    assert evidence["exit_code"] is None
    assert not _qemu_children()


def test_keyboard_interrupt_still_kills_and_reaps_qemu():
    kernel, _ = kvm.probe_kernel()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            kvm._boot(kernel, "tcg", timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not _qemu_children()
