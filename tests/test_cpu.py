"""cpu_baseline: the level table, the QEMU model each boot uses, and a real NumPy wheel's
stated baseline at lock time. The booted guest's level is checked by every e2e validation
("cpu: the VM runs at ...")."""

import subprocess
import sys
from pathlib import Path

from factory import cpu
from factory.profile import load_profile
from tests.conftest import DEMO_PROFILE, run_factory
from tests.test_resolve import profile_with


def test_levels_order_and_models():
    assert cpu.lower_level("x86-64-v3", "x86-64-v2") == "x86-64-v2"
    assert cpu.QEMU_MODELS[cpu.DEFAULT_LEVEL] == "Nehalem"
    assert cpu.level_of_features(["X86_V2"]) == "x86-64-v2"
    assert cpu.level_of_features(["SSE", "SSE2", "SSE3"]) == "x86-64-v1"
    assert cpu.level_of_features(["SSE42", "AVX2"]) == "x86-64-v3"
    assert cpu.level_of_features(["AVX512_SKX"]) == "x86-64-v4"


def test_tcg_never_boots_above_the_faithful_level():
    """TCG boots v1 and v2 as promised; v3/v4 at v2, and the choice says it proves less."""
    v1 = cpu.validation_cpu("x86-64-v1", "tcg")
    assert (v1.model, v1.level, v1.proves_promise) == ("qemu64", "x86-64-v1", True)
    v3 = cpu.validation_cpu("x86-64-v3", "tcg")
    assert (v3.model, v3.level, v3.proves_promise) == ("Nehalem", "x86-64-v2", False)
    kvm = cpu.validation_cpu("x86-64-v3", "kvm")
    assert (kvm.model, kvm.proves_promise) == ("Haswell-noTSX", True)
    assert cpu.build_cpu_model("kvm") == "host"


def test_tcg_boots_take_amds_vendor_id_and_kvm_boots_keep_the_models():
    """Under TCG the guest sees AMD's vendor id (no Meltdown, so no page-table isolation);
    under KVM the model is passed as it is."""
    tcg = cpu.validation_cpu("x86-64-v2", "tcg")
    assert tcg.qemu_cpu == "Nehalem,vendor=AuthenticAMD"
    assert "vendor id AuthenticAMD" in tcg.describe()
    assert cpu.build_cpu_model("tcg") == "Nehalem,vendor=AuthenticAMD"
    kvm = cpu.validation_cpu("x86-64-v2", "kvm")
    assert (kvm.qemu_cpu, kvm.vendor_id) == ("Nehalem", None)


def test_guest_level_from_flags():
    v2 = set(cpu.LEVEL_FLAGS["x86-64-v1"] + cpu.LEVEL_FLAGS["x86-64-v2"])
    assert cpu.guest_level_problem(v2, "x86-64-v2", exact=True) is None
    assert "lacks avx" in cpu.guest_level_problem(v2, "x86-64-v3", exact=False)
    v3 = v2 | set(cpu.LEVEL_FLAGS["x86-64-v3"])
    assert "does not hold" in cpu.guest_level_problem(v3, "x86-64-v2", exact=True)
    assert cpu.guest_level_problem(v3, "x86-64-v2", exact=False) is None


def _numpy_wheel(tmp_path: Path, version: str) -> Path:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path)]
    command += ["--only-binary=:all:", "--python-version", "3.11", "--platform"]
    command += ["manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]
    subprocess.run([*command, f"numpy=={version}"], check=True)
    return next(tmp_path.glob(f"numpy-{version}-*.whl"))


def test_numpy_wheels_state_their_baseline(tmp_path):
    """NumPy 2.4 wheels need x86-64-v2; NumPy 1.26 wheels run on any x86-64."""
    assert cpu.wheel_baseline("numpy", _numpy_wheel(tmp_path, "2.4.6")) == ["X86_V2"]
    old = cpu.wheel_baseline("numpy", _numpy_wheel(tmp_path, "1.26.4"))
    assert old and cpu.level_of_features(old) == "x86-64-v1"


def test_lock_refuses_numpy_above_the_profiles_baseline(tmp_path, test_channel):
    path = profile_with(tmp_path, test_channel, "[python=3.11, pip]", "[numpy==2.4.6]")
    path.write_text(path.read_text() + "cpu_baseline: x86-64-v1\n")
    result = run_factory("lock", str(path))
    assert result.returncode == 3  # a conflict: change the packages or the level
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1] == (
        "error: environment 'model': numpy 2.4.6 needs an x86-64-v2 CPU (its wheel's baseline "
        "is X86_V2), but cpu_baseline is x86-64-v1; raise cpu_baseline to x86-64-v2 or pin an "
        "older numpy that runs on x86-64-v1"
    )
    path.write_text(path.read_text().replace("x86-64-v1", "x86-64-v2"))
    assert run_factory("lock", str(path)).returncode == 0
    assert load_profile(path).profile.cpu_baseline == "x86-64-v2"


def test_unknown_level_is_one_line(tmp_path, test_channel):
    path = profile_with(tmp_path, test_channel, "[six]")
    path.write_text(path.read_text() + "cpu_baseline: x86-64-v5\n")
    result = run_factory("lock", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cpu_baseline" in result.stderr and "x86-64-v2" in result.stderr


def test_cpu_check_runs_against_this_machine():
    """The validator's CPU check through the local target: this host has the default level,
    and, read as a VM held at v2, it fails exactly when the host has AVX2."""
    from factory.validate.context import CheckContext
    from factory.validate.suites import run_all_checks
    from factory.validate.target import LocalTarget

    loaded = load_profile(DEMO_PROFILE)
    ctx = CheckContext(target=LocalTarget(), loaded=loaded, throwaway_vm=False)
    (result,) = run_all_checks(ctx, only=("cpu",))
    assert result.name == "cpu: this machine supports x86-64-v2 (the profile's cpu_baseline)"
    assert result.status == "passed", result.detail
    ctx.extra["cpu"] = cpu.validation_cpu("x86-64-v3", "tcg")
    held, skipped = run_all_checks(ctx, only=("cpu",))
    host_has_avx2 = " avx2 " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    assert held.status == ("failed" if host_has_avx2 else "passed"), held.detail
    assert skipped.status == "skipped" and "factory validate --host" in skipped.detail
