"""The firewall: nftables drops every inbound port the profile does not open, only those ports
listen beyond loopback, and a port opened inside but not listed cannot be reached."""

from __future__ import annotations

import json
import re
import time

from factory.validate.context import FAILED, CheckContext, CheckResult, result

GROUP = "firewall"
LOOPBACK = re.compile(r"^(127\.|\[::1\]|\[::ffff:127\.)")


def tcp_listeners(ctx: CheckContext) -> list[tuple[str, int]]:
    """(local address, port) of every listening TCP socket, as `ss -Htln` shows them."""
    listeners = []
    for line in ctx.target.run("ss -Htln").stdout.splitlines():
        address, _, port = line.split()[3].rpartition(":")
        listeners.append((address, int(port)))
    return listeners


def accepted_tcp_ports(ruleset: dict) -> tuple[str | None, set[int]]:
    """The input chain's policy and the TCP ports its rules accept, from `nft -j`."""
    policy, ports = None, set()
    for item in ruleset.get("nftables", []):
        chain = item.get("chain")
        if chain and chain.get("hook") == "input":
            policy = chain.get("policy")
        rule = item.get("rule")
        if not rule or not any("accept" in e for e in rule.get("expr", [])):
            continue
        for expr in rule["expr"]:
            match = expr.get("match", {})
            left = match.get("left", {}).get("payload", {})
            if left.get("protocol") == "tcp" and left.get("field") == "dport":
                right = match.get("right")
                values = right.get("set", []) if isinstance(right, dict) else [right]
                ports |= {v for v in values if isinstance(v, int)}
    return policy, ports


def check_firewall(ctx: CheckContext) -> list[CheckResult]:
    profile = ctx.loaded.profile
    wanted = set(profile.open_ports())
    results = []
    if profile.security.firewall:
        listed = ctx.target.run("sudo nft -j list ruleset")
        try:
            policy, accepted = accepted_tcp_ports(json.loads(listed.stdout or "{}"))
        except json.JSONDecodeError:
            policy, accepted = None, set()
        results.append(
            result(
                "firewall: inbound dropped except the profile's ports",
                policy == "drop" and accepted == wanted,
                f"input policy {policy}; accepts TCP {sorted(accepted)}; profile {sorted(wanted)}",
                GROUP,
            )
        )
    listening = {port for address, port in tcp_listeners(ctx) if not LOOPBACK.match(address)}
    expected = {22} | ({80, 443} if profile.jupyter.enabled else set())
    expected |= {9100} if profile.monitoring.enabled else set()
    unexpected, missing = listening - wanted, expected - listening
    results.append(
        result(
            "firewall: only the listed ports listen",
            not unexpected and not missing,
            f"listening beyond loopback: {sorted(listening)}"
            + (f"; not in the profile: {sorted(unexpected)}" if unexpected else "")
            + (f"; not listening: {sorted(missing)}" if missing else ""),
            GROUP,
        )
    )
    reachable = hasattr(ctx.target, "request")
    if ctx.throwaway_vm and reachable and ctx.unlisted_port and profile.security.firewall:
        results.append(_unlisted_port_blocked(ctx, ctx.unlisted_port))
    return results


def _unlisted_port_blocked(ctx: CheckContext, port: int) -> CheckResult:
    """Open a listener on a port the profile does not name; inside it answers, from outside
    the firewall must drop it."""
    name = f"firewall: port {port} (not listed) is unreachable from outside"
    ctx.target.run(
        f"sudo systemd-run --unit factory-probe-{port} --uid nobody "
        f"python3 -m http.server --bind 0.0.0.0 --directory /tmp {port}"
    )
    try:
        inside = ""
        for _ in range(20):
            inside = ctx.target.run(
                f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/"
            ).stdout
            if inside == "200":
                break
            time.sleep(1)
        if inside != "200":
            return CheckResult(name, FAILED, "the probe listener did not start", group=GROUP)
        try:
            answer = ctx.target.request(port, "/", timeout=8)
            return CheckResult(
                name, FAILED, f"answered HTTP {answer.status} from outside", group=GROUP
            )
        except (OSError, ConnectionError) as error:
            return result(name, True, f"inside: HTTP 200; outside: {type(error).__name__}", GROUP)
    finally:
        ctx.target.run(f"sudo systemctl stop factory-probe-{port}")
