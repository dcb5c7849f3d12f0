"""Services the image adds: the node exporter is scraped (from outside when monitoring is on),
Prometheus scrapes its targets, and long-running services run as their own users."""

from __future__ import annotations

import re

from factory.validate.context import CheckContext, CheckResult, result, unit_user

NODE_EXPORTER_PORT = 9100


def check_monitoring(ctx: CheckContext) -> list[CheckResult]:
    group = "monitoring"
    profile = ctx.loaded.profile
    try:
        if profile.monitoring.enabled and hasattr(ctx.target, "request"):
            where = f"from outside on port {NODE_EXPORTER_PORT}"
            body = ctx.target.request(NODE_EXPORTER_PORT, "/metrics").body
        else:
            where = f"on 127.0.0.1:{NODE_EXPORTER_PORT}"
            body = ctx.target.run(
                f"curl -s -m 20 http://127.0.0.1:{NODE_EXPORTER_PORT}/metrics"
            ).stdout
    except (OSError, ConnectionError) as error:
        where, body = f"failed: {error}", ""
    series = len(re.findall(r"^node_", body, re.M))
    results = [
        result(
            "monitoring: node exporter metrics are scraped",
            "node_cpu_seconds_total" in body,
            f"{series} node_* samples {where}",
            group,
        )
    ]
    if profile.monitoring.prometheus:
        targets = ctx.target.run("curl -s -m 20 http://127.0.0.1:9090/api/v1/targets").stdout
        health = re.findall(r'"health":"(\w+)"', targets)
        results.append(
            result(
                "monitoring: Prometheus scrapes its targets",
                bool(health) and all(h == "up" for h in health),
                f"target health: {health or 'no answer'}",
                group,
            )
        )
    return results


def check_services_unprivileged(ctx: CheckContext) -> list[CheckResult]:
    """Long-running services the image adds run as their own users."""
    units = ["prometheus-node-exporter"]
    if ctx.loaded.profile.jupyter.enabled:
        units.append("jupyter")
    owners = {unit: unit_user(ctx, unit) for unit in units}
    if ctx.loaded.profile.jupyter.enabled:
        workers = ctx.target.run("ps -C nginx -o user=,args= | grep 'worker process'").stdout
        owners["nginx workers"] = ",".join(sorted({w.split()[0] for w in workers.splitlines()}))
    bad = [unit for unit, user in owners.items() if user in ("", "root")]
    return [
        result(
            "services: run unprivileged",
            not bad,
            "; ".join(f"{unit} as {user or 'not running'}" for unit, user in owners.items()),
            "services",
        )
    ]
