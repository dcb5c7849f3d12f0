"""Environment snapshots (profile `snapshots`): the timer is on, and in a throwaway VM one
snapshot is taken, an environment is broken and `factory-env rollback` brings it back to
exactly what it held."""

from __future__ import annotations

from factory.image_layout import CONDA_ENVS, SNAPSHOTS_DIR
from factory.validate.context import SKIPPED, CheckContext, CheckResult, quote, result
from factory.validate.env import export_environment

GROUP = "snapshots"
TIMER = "factory-snapshot.timer"


def _smallest_environment(ctx: CheckContext) -> str:
    """The environment with the fewest locked packages: the quickest to roll back."""
    sizes = {
        lock["name"]: len(lock["conda"]) + len(lock["pip"])
        for lock in ctx.locks
        if lock["name"] != "jupyter"
    }
    names = [env.name for env in ctx.loaded.profile.environments]
    return min(names, key=lambda name: sizes.get(name, 10**6))


def _rollback(ctx: CheckContext, env: str, snapshot: str) -> CheckResult:
    name = f"snapshots: {env} broken, then rolled back to {snapshot}"
    before = export_environment(ctx, env)
    python = f"{CONDA_ENVS}/{env}/bin/python"
    ctx.target.run(f"sudo rm -rf {quote(python)}* {CONDA_ENVS}/{env}/lib/python3*/site-packages")
    broken = not ctx.target.run(f"{python} -c pass").ok
    rolled = ctx.target.run(
        f"sudo factory-env rollback {quote(env)} {quote(snapshot)}", timeout=1800
    )
    after = export_environment(ctx, env)
    same = before is not None and after == before
    detail = (
        f"broken: {'yes' if broken else 'no (the break did not take)'}; rollback exit "
        f"{rolled.exit_code}; "
        + ("the same packages as before" if same else f"differs: {rolled.stderr.strip()[-300:]}")
    )
    return result(name, broken and rolled.ok and same, detail, GROUP)


def check_snapshots(ctx: CheckContext) -> list[CheckResult]:
    if ctx.loaded.profile.snapshots is None:
        return []
    enabled = ctx.target.run(f"systemctl is-enabled {TIMER}").stdout.strip()
    active = ctx.target.run(f"systemctl is-active {TIMER}").stdout.strip()
    results = [
        result(
            f"snapshots: {TIMER} is on",
            enabled == "enabled" and active == "active",
            f"{enabled}, {active}",
            GROUP,
        )
    ]
    if not ctx.throwaway_vm:
        reason = "takes a snapshot and breaks an environment: only in a throwaway VM"
        return results + [CheckResult("snapshots: rollback", SKIPPED, reason, group=GROUP)]
    taken = ctx.target.run(
        "sudo systemctl start factory-snapshot.service && sudo factory-env snapshots",
        timeout=900,
    )
    snapshot = (taken.stdout.strip().splitlines() or [""])[-1]
    envs = sorted(e.name for e in ctx.loaded.profile.environments)
    listed = ctx.target.run(f"sudo ls {SNAPSHOTS_DIR}/{quote(snapshot)}/envs").stdout.split()
    results.append(
        result(
            "snapshots: a snapshot holds every environment",
            taken.ok and set(envs) <= set(listed),
            f"{SNAPSHOTS_DIR}/{snapshot or '(none)'}: {', '.join(listed) or taken.stderr[-300:]}",
            GROUP,
        )
    )
    if taken.ok and snapshot:
        results.append(_rollback(ctx, _smallest_environment(ctx), snapshot))
    return results
