"""The audit trail: auditd records logins, sudo and reads of the Jupyter token with locked
rules, the journal keeps logins, and every log is kept as long as the profile says."""

from __future__ import annotations

import re

from factory.image_layout import JUPYTER_ACCESS_LOG
from factory.validate.context import CheckContext, CheckResult, result
from factory.validate.web import unverified_tls


def check_audit(ctx: CheckContext) -> list[CheckResult]:
    group = "audit"
    days = ctx.loaded.profile.security.audit_retention_days
    active = ctx.target.run("systemctl is-active auditd").stdout.strip()
    rules = ctx.target.run("sudo auditctl -l").stdout
    keys = sorted(set(re.findall(r"-k (factory-[\w-]+)", rules)))
    results = [
        result(
            "audit: auditd is active with the login, sudo and token rules",
            active == "active"
            and {"factory-login", "factory-sudo", "factory-jupyter-token"} <= set(keys),
            f"auditd {active}; rule keys {keys}",
            group,
        )
    ]
    sudo_events = ctx.target.run("sudo ausearch --input-logs -k factory-sudo --format text").stdout
    results.append(
        result(
            "audit: sudo is recorded",
            "sudo" in sudo_events,
            f"{len(sudo_events.splitlines())} sudo event(s) in the audit log",
            group,
        )
    )
    journal = ctx.target.run(
        "sudo journalctl -b --no-pager -o cat _COMM=sshd | grep -c 'Accepted publickey'"
    ).stdout.strip()
    stored = ctx.target.run("sudo find /var/log/journal -name 'system*.journal' | head -1").stdout
    results.append(
        result(
            "audit: logins are kept in the persistent journal",
            bool(stored.strip()) and journal not in ("", "0"),
            f"{journal or 0} key logins this boot; journal file {stored.strip() or 'missing'}",
            group,
        )
    )
    config = ctx.target.run(
        "systemd-analyze cat-config systemd/journald.conf; cat /etc/logrotate.d/nginx"
    ).stdout
    retention = re.findall(r"^MaxRetentionSec=(\S+)", config, re.M)
    rotate = re.findall(r"^\s*rotate (\d+)", config, re.M)
    max_use = re.findall(r"^SystemMaxUse=(\S+)", config, re.M)
    auditd = dict(
        re.findall(
            r"^(\w+) = (\S+)$", ctx.target.run("sudo cat /etc/audit/auditd.conf").stdout, re.M
        )
    )
    results.append(
        result(
            f"audit: logs are kept {days} days",
            retention[-1:] == [f"{days}day"]
            and bool(max_use)
            and auditd.get("max_log_file_action", "").upper() == "KEEP_LOGS"
            and (not ctx.loaded.profile.jupyter.enabled or rotate == [str(days)]),
            f"journald MaxRetentionSec {retention[-1:] or 'unset'}, SystemMaxUse "
            f"{max_use[-1:] or 'default (10% of the disk, at most 4 GiB)'}; auditd "
            f"max_log_file_action {auditd.get('max_log_file_action', 'unset')}; "
            f"nginx rotate {rotate}",
            group,
        )
    )
    status = ctx.target.run("sudo auditctl -s").stdout
    enabled = re.search(r"^enabled (\d)", status, re.M)
    actions = ("space_left_action", "admin_space_left_action", "disk_full_action")
    suspends = [k for k in actions if auditd.get(k, "SUSPEND").upper() in ("SUSPEND", "IGNORE")]
    results.append(
        result(
            "audit: rules are locked and auditd never stops recording silently",
            enabled is not None and enabled.group(1) == "2" and not suspends,
            f"auditctl enabled {enabled.group(1) if enabled else 'unknown'} (2: locked); "
            + "; ".join(f"{k} {auditd.get(k, 'SUSPEND')}" for k in actions),
            group,
        )
    )
    if ctx.loaded.profile.jupyter.enabled:
        if hasattr(ctx.target, "request"):
            # One request of its own, so that `--only audit` has one to find; nginx logs it
            # whatever Jupyter answers.
            try:
                ctx.target.request(443, "/api/status", tls=unverified_tls(), timeout=60)
            except (OSError, ConnectionError, ValueError):
                pass  # the https group reports an nginx that does not answer
        access = ctx.target.run(f"sudo grep -c 'GET /api/' {JUPYTER_ACCESS_LOG}").stdout.strip()
        results.append(
            result(
                "audit: Jupyter access is logged",
                access not in ("", "0"),
                f"{access or 0} API request(s) in {JUPYTER_ACCESS_LOG}",
                group,
            )
        )
    return results
