"""cloud-init finished its first boot without errors."""

from __future__ import annotations

import re

from factory.validate.context import CheckContext, CheckResult, result


def check_cloud_init(ctx: CheckContext) -> list[CheckResult]:
    answer = ctx.target.run("cloud-init status --wait --long", timeout=900)
    status = re.search(r"^status:\s*(\S+)", answer.stdout, re.M)
    value = status.group(1) if status else "unknown"
    errors = re.search(r"^errors:\s*(.*)$", answer.stdout, re.M)
    detail = f"status: {value}" + (f"; errors: {errors.group(1)}" if errors else "")
    return [
        result("cloud-init: finished without errors", value == "done" and answer.ok, detail, "boot")
    ]
