"""Updates: every security update the image was built against is installed, and automatic
security updates are on or off as the profile says."""

from __future__ import annotations

from factory import updates
from factory.validate.context import CheckContext, CheckResult, result

SECURITY_SOURCES = (
    "cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources "
    "2>/dev/null | grep -E '^[^#]*-security' || true"
)


def check_updates(ctx: CheckContext) -> list[CheckResult]:
    return [_security_updates_installed(ctx), _automatic_updates(ctx)]


def _security_updates_installed(ctx: CheckContext) -> CheckResult:
    """Every package the image was built with is at the newest version its security index
    holds; a live host is checked against its own apt lists."""
    name = "updates: every security update is installed"
    if "security_index" not in ctx.extra:
        pending = ctx.target.run(
            "apt-get -s -o Debug::NoLocking=1 dist-upgrade 2>/dev/null | grep '^Inst .*-security'"
        ).stdout.splitlines()
        return result(
            name,
            not pending,
            "; ".join(pending) or "apt's own lists hold no pending security update",
            "updates",
        )
    index = ctx.extra["security_index"]
    if index is None:
        return result(name, False, "the image was built without a security suite", "updates")
    listing = ctx.target.run("dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\\n'")
    installed = updates.parse_dpkg_query(listing.stdout)
    pending = updates.pending_updates(installed, index)
    return result(
        f"updates: every security update of {index.suite} ({index.date}) is installed",
        bool(installed) and not pending,
        "; ".join(pending[:10]) + (f" and {len(pending) - 10} more" if len(pending) > 10 else "")
        or f"{len(installed)} packages checked against {len(index.packages)} in the index",
        "updates",
    )


def _automatic_updates(ctx: CheckContext) -> CheckResult:
    wanted = ctx.loaded.profile.security.unattended_upgrades
    value = ctx.target.run("apt-config dump APT::Periodic::Unattended-Upgrade").stdout
    enabled = ctx.target.run("systemctl is-enabled apt-daily-upgrade.timer").stdout.strip()
    sources = ctx.target.run(SECURITY_SOURCES).stdout.strip()
    origins = ctx.target.run("apt-config dump Unattended-Upgrade::Origins-Pattern").stdout
    on = (
        '"1"' in value
        and enabled == "enabled"
        and bool(sources)
        and "label=Debian-Security" in origins
    )
    off = '"1"' not in value and enabled != "enabled"
    detail = [
        value.strip() or "Unattended-Upgrade unset",
        f"apt-daily-upgrade.timer {enabled}",
    ]
    if wanted:
        detail.append(
            f"security source: {sources.splitlines()[0]}" if sources else "no security source"
        )
        if "label=Debian-Security" not in origins:
            detail.append("unattended-upgrades does not take Debian-Security")
    return result(
        f"updates: automatic security updates are {'on' if wanted else 'off'}",
        on if wanted else off,
        "; ".join(detail),
        "updates",
    )
