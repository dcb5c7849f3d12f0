"""The client's services (profile `services`): each answers its health URL through nginx over
TLS, runs as its own user, listens on loopback only, has its first-boot secrets, and systemd
starts it again when it dies."""

from __future__ import annotations

import time

from factory.image_layout import SERVICES_CONFIG_DIR, TLS_CERTIFICATE
from factory.profile.services import Service
from factory.service_units import service_unit_name
from factory.validate.context import (
    SKIPPED,
    CheckContext,
    CheckResult,
    quote,
    result,
    unit_user,
)
from factory.validate.firewall import LOOPBACK, tcp_listeners
from factory.validate.https import certificate_name
from factory.validate.web import tls_context

GROUP = "client-services"


def health_through_nginx(ctx: CheckContext, service: Service) -> tuple[bool, str]:
    """GET https://HOST/<name><health> as a caller would: from outside when the target
    reaches the machine's ports, else from the machine itself."""
    path = f"/{service.name}{service.health}"
    target = ctx.target
    if hasattr(target, "request"):
        cert_pem = target.run(f"cat {TLS_CERTIFICATE}").stdout
        name = certificate_name(cert_pem, target.run("hostname").stdout.strip())
        try:
            answer = target.request(
                443, path, tls=tls_context(cert_pem), server_name=name, timeout=30
            )
        except (OSError, ConnectionError) as error:
            return False, f"https://{name}{path}: {error}"
        return answer.status == 200, f"https://{name}{path} answered {answer.status}"
    status = target.run(
        f"curl -sk -o /dev/null -m 20 -w '%{{http_code}}' {quote('https://127.0.0.1' + path)}"
    ).stdout.strip()
    return status == "200", f"https://127.0.0.1{path} answered {status or 'nothing'}"


def _main_pid(ctx: CheckContext, unit: str) -> str:
    return ctx.target.run(f"systemctl show -p MainPID --value {unit}.service").stdout.strip()


def _restarts(ctx: CheckContext, service: Service) -> CheckResult:
    """Kill the service's process (a throwaway VM only) and wait for systemd to start it."""
    name = f"{service.name}: restarts on failure"
    unit = service_unit_name(service)
    if not ctx.throwaway_vm:
        policy = ctx.target.run(f"systemctl show -p Restart --value {unit}.service").stdout
        return result(name, policy.strip() == "on-failure", f"Restart={policy.strip()}", GROUP)
    before = _main_pid(ctx, unit)
    ctx.target.run(f"sudo kill -KILL {quote(before)}")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        time.sleep(3)
        after = _main_pid(ctx, unit)
        if after not in ("", "0", before) and health_through_nginx(ctx, service)[0]:
            return result(name, True, f"killed pid {before}; pid {after} answers again", GROUP)
    return result(name, False, f"killed pid {before}; no healthy process within 90 s", GROUP)


def check_service(ctx: CheckContext, service: Service) -> list[CheckResult]:
    unit = service_unit_name(service)
    healthy, detail = health_through_nginx(ctx, service)
    active = ctx.target.run(f"systemctl is-active {unit}.service").stdout.strip()
    results = [
        result(
            f"{service.name}: answers {service.health} through nginx over TLS",
            healthy,
            f"{detail}; {unit} is {active}",
            GROUP,
        )
    ]
    user = unit_user(ctx, unit)
    results.append(
        result(
            f"{service.name}: runs as its own user {service.user}",
            user == service.user,
            f"runs as {user or 'nothing (not running)'}",
            GROUP,
        )
    )
    addresses = [address for address, port in tcp_listeners(ctx) if port == service.port]
    results.append(
        result(
            f"{service.name}: port {service.port} reachable only through nginx",
            bool(addresses) and all(LOOPBACK.match(a) for a in addresses),
            f"listens on {', '.join(addresses) or 'nothing'}",
            GROUP,
        )
    )
    if service.secrets:
        env_file = SERVICES_CONFIG_DIR / f"{service.name}.env"
        facts = ctx.target.run(
            f"sudo stat -c '%a %U' {env_file} && sudo sed -n 's/=.*//p' {env_file}"
        ).stdout.split()
        made = facts[:2] == ["600", "root"] and set(service.secrets) <= set(facts[2:])
        results.append(
            result(
                f"{service.name}: secrets made on this machine's first boot",
                made,
                f"{env_file}: {' '.join(facts[:2]) or 'missing'}; holds {', '.join(facts[2:])}",
                GROUP,
            )
        )
    if healthy:
        results.append(_restarts(ctx, service))
    else:
        results.append(
            CheckResult(f"{service.name}: restarts on failure", SKIPPED, "not healthy", group=GROUP)
        )
    return results


def check_client_services(ctx: CheckContext) -> list[CheckResult]:
    results = []
    for service in ctx.loaded.profile.services:
        results += check_service(ctx, service)
    return results
