"""The ordered registry of check suites: which checks a profile implies, in a stable order,
each named by the group `factory validate --only` selects."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from factory.errors import OptionError
from factory.resolve import image_environments
from factory.validate import (
    audit,
    client_services,
    cloudinit,
    cpu,
    env,
    firewall,
    gpu,
    https,
    hygiene,
    inventory,
    jupyter,
    offline,
    services,
    snapshots,
    ssh,
    updates,
)
from factory.validate.context import FAILED, CheckContext, CheckResult

SUITES = (
    "importer",
    "cpu",
    "cloud-init",
    "env",
    "lock",
    "sbom",
    "jupyter",
    "https",
    "kernels",
    "ssh",
    "firewall",
    "services",
    "client-services",
    "monitoring",
    "audit",
    "updates",
    "credentials",
    "hygiene",
    "offline",
    "snapshots",
    "gpu",
)


def parse_groups(only: str | None) -> tuple[str, ...]:
    """The groups a comma-separated `--only` names, in SUITES order; all of them for None."""
    if only is None:
        return SUITES
    groups = {g.strip() for g in only.split(",") if g.strip()}
    unknown = sorted(groups - set(SUITES))
    if unknown or not groups:
        raise OptionError(
            f"--only: unknown group(s) {', '.join(unknown) or '(none given)'}; "
            f"use some of {', '.join(SUITES)}"
        )
    return tuple(g for g in SUITES if g in groups)


def partial(groups: Iterable[str]) -> list[str] | None:
    """The groups as a report records them: None when they are all of SUITES."""
    chosen = [g for g in SUITES if g in set(groups)]
    return None if chosen == list(SUITES) else chosen


Check = Callable[[CheckContext], list[CheckResult]]
# After the per-environment and per-lock suites, in this order ("importer" boots its own VM
# and runs in run.py).
MACHINE_CHECKS: list[tuple[str, Check]] = [
    ("sbom", inventory.check_sbom),  # before `offline` adds its probe environment
    ("jupyter", jupyter.check_jupyter),
    ("https", https.check_https),
    ("kernels", jupyter.check_kernels_and_samples),
    ("ssh", ssh.check_ssh_hardening),
    ("firewall", firewall.check_firewall),
    ("services", services.check_services_unprivileged),
    ("client-services", client_services.check_client_services),
    ("monitoring", services.check_monitoring),
    ("audit", audit.check_audit),
    ("updates", updates.check_updates),
    ("credentials", hygiene.check_build_credentials_removed),
    ("hygiene", hygiene.check_image_hygiene),
    ("offline", offline.check_offline),
    ("snapshots", snapshots.check_snapshots),  # breaks and restores an environment: late
    ("gpu", gpu.check_gpu_level1),
    ("gpu", gpu.check_gpu_level2),
]


def planned_suites(ctx: CheckContext) -> list[tuple[str, Callable[[], list[CheckResult]]]]:
    """(group, check) for every check the profile implies, in the order they run."""
    suites: list[tuple[str, Callable[[], list[CheckResult]]]] = [
        ("cpu", lambda: cpu.check_cpu_level(ctx)),
        ("cloud-init", lambda: cloudinit.check_cloud_init(ctx)),
    ]
    suites += [
        ("env", lambda environment=environment: env.check_environment(ctx, environment))
        for environment in image_environments(ctx.loaded)
    ]
    suites += [("lock", lambda lock=lock: env.check_matches_lock(ctx, lock)) for lock in ctx.locks]
    suites += [(key, lambda check=check: check(ctx)) for key, check in MACHINE_CHECKS]
    return suites


Plan = Callable[[CheckContext], list[tuple[str, Callable[[], list[CheckResult]]]]]


def run_all_checks(
    ctx: CheckContext, only: Iterable[str] = SUITES, plan: Plan = planned_suites
) -> list[CheckResult]:
    """Every check the profile implies, in a stable order; `only` names a subset of SUITES.
    `plan` chooses the checks for another kind of target (a container: validate/container.py)."""
    wanted = set(only)
    results: list[CheckResult] = []
    for key, suite in plan(ctx):
        if key not in wanted:
            continue
        started = time.monotonic()
        try:
            batch = suite()
        except Exception as error:  # a crashed check is a failed check, never a pass
            batch = [CheckResult(f"check crashed: {type(error).__name__}", FAILED, str(error))]
        spent = (time.monotonic() - started) / max(len(batch), 1)
        for item in batch:
            item.seconds = round(spent, 2)
        results += batch
    return results
