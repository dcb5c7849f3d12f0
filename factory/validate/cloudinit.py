"""cloud-init finished its first boot without errors, or stayed off because the VM was booted
without a seed (its generator found no datasource: an importer's boot)."""

from __future__ import annotations

import re

from factory.validate.context import CheckContext, CheckResult, result

NO_SEED = "disabled-by-generator"


def check_cloud_init(ctx: CheckContext) -> list[CheckResult]:
    answer = ctx.target.run("cloud-init status --wait --long", timeout=900)
    status = re.search(r"^status:\s*(\S+)", answer.stdout, re.M)
    value = status.group(1) if status else "unknown"
    boot = re.search(r"^boot_status_code:\s*(\S+)", answer.stdout, re.M)
    errors = re.search(r"^errors:\s*(.*)$", answer.stdout, re.M)
    unseeded = value == "disabled" and boot is not None and boot.group(1) == NO_SEED
    detail = (
        f"status: {value}"
        + (" (no seed disk: no datasource found)" if unseeded else "")
        + (f"; errors: {errors.group(1)}" if errors else "")
    )
    return [
        result(
            "cloud-init: finished without errors",
            (value == "done" or unseeded) and answer.ok,
            detail,
            "boot",
        )
    ]
