"""CPU checks: the machine runs at the profile's cpu_baseline. A VM we boot must be held at
exactly the level it was booted for; a live host must have at least the profile's level. A
level the emulator cannot run faithfully is reported as skipped, never as passed."""

from __future__ import annotations

from factory import cpu
from factory.validate.context import SKIPPED, CheckContext, CheckResult, result

GROUP = "cpu"


def check_cpu_level(ctx: CheckContext) -> list[CheckResult]:
    promised = ctx.loaded.profile.cpu_baseline
    choice: cpu.CpuChoice | None = ctx.extra.get("cpu")
    level = choice.level if choice else promised
    flags_line = ctx.target.run("grep -m1 '^flags' /proc/cpuinfo").stdout
    flags = set(flags_line.partition(":")[2].split())
    problem = cpu.guest_level_problem(flags, level, exact=choice is not None)
    if choice is not None:
        name = f"cpu: the VM runs at {level} (QEMU model {choice.model})"
    else:
        name = f"cpu: this machine supports {promised} (the profile's cpu_baseline)"
    detail = problem or f"{len(flags)} CPU flags"
    if choice is not None and choice.vendor_id:
        detail += f"; vendor id {choice.vendor_id}"
    results = [result(name, problem is None, detail, GROUP)]
    if choice is not None and not choice.proves_promise:
        results.append(
            CheckResult(
                f"cpu: {promised} (the profile's cpu_baseline) is proven",
                SKIPPED,
                f"skipped: {choice.accelerator.upper()} does not emulate {promised} "
                f"faithfully (QEMU's AVX2 emulation crashes NumPy), so this boot proves "
                f"{level}; run `factory validate --host` on the client's hardware to prove "
                f"{promised}",
                group=GROUP,
            )
        )
    return results
