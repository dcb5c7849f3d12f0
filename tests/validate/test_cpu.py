"""cpu: the VM runs at exactly the level it was booted for."""

from factory.validate.cpu import check_cpu_level
from tests.validate.conftest import statuses

FLAGS = "grep -m1 '^flags' /proc/cpuinfo"


def test_the_recorded_boot_runs_at_x86_64_v2(ctx):
    assert statuses(check_cpu_level(ctx)) == {
        "cpu: the VM runs at x86-64-v2 (QEMU model Nehalem)": "passed"
    }


def test_a_vm_without_sse4_2_is_below_the_level(ctx, target):
    flags = target.commands[FLAGS].stdout
    target.answer(FLAGS, stdout=flags.replace(" sse4_2", ""))
    (result,) = check_cpu_level(ctx)
    assert result.status == "failed", result.detail


def test_a_vm_with_avx2_is_above_the_level_it_must_be_held_at(ctx, target):
    target.answer(FLAGS, stdout=target.commands[FLAGS].stdout.rstrip("\n") + " avx2 fma bmi2\n")
    assert list(statuses(check_cpu_level(ctx)).values()) == ["failed"]
