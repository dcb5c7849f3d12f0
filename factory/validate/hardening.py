"""Checks of what an IT department accepts: TLS in front of Jupyter, the firewall, the audit
trail, updates, unprivileged services, monitoring and an image free of build secrets."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from dataclasses import dataclass

from cryptography import x509

from factory import updates
from factory.escape import shell_word
from factory.validate.checks import (
    FAILED,
    SKIPPED,
    CheckContext,
    CheckResult,
    _result,
    jupyter_token,
    unit_user,
)

FIRST_BOOT_SECRETS = [
    "/etc/ssh/ssh_host_ed25519_key",
    "/etc/ssh/ssh_host_rsa_key",
    "/etc/factory/jupyter.env",
    "/etc/factory/tls/jupyter.key",
]
TLS_CERT = "/etc/factory/tls/jupyter.crt"
PRIVATE_KEY_MARK = "PRIVATE KEY-----"
SCANNED_DIRS = "/etc /root /home /srv /var /tmp /opt/factory /usr/local"
# Where the running Jupyter server keeps its own connection files (mode 0600, its user).
JUPYTER_RUNTIME = "/srv/jupyter/.local/share/jupyter/runtime/"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: str
    peer_cert: bytes | None = None


def http_request(
    address: tuple[str, int],
    path: str,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
    timeout: float = 30,
) -> Answer:
    """One HTTP/1.1 request over a raw socket (TLS optional); the answer's head and up to
    64 KiB of its body."""
    sock = socket.create_connection(address, timeout=timeout)
    peer_cert = None
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_name)
            peer_cert = sock.getpeercert(binary_form=True)
        lines = [f"GET {path} HTTP/1.1", f"Host: {server_name or address[0]}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if "Upgrade" not in (headers or {}):
            lines.append("Connection: close")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and data.startswith(b"HTTP/1.1 101"):
                break
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode(errors="replace").split("\r\n")
    match = re.match(r"HTTP/\d\.\d (\d{3})", status_line)
    if not match:
        raise ConnectionError(f"no HTTP answer (got {status_line[:80]!r})")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Answer(int(match.group(1)), parsed, body.decode(errors="replace"), peer_cert)


def _tls_context(cert_pem: str) -> ssl.SSLContext:
    """Trust exactly the certificate (chain) the machine holds: its leaf, or a client's chain
    without its root (partial chains allowed), and check the name the leaf is issued for."""
    context = ssl.create_default_context(cadata=cert_pem)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = True
    return context


def certificate_name(cert_pem: str, hostname: str) -> str:
    """The name to ask the server for: the machine's hostname when the leaf certificate is
    issued for it, else the leaf's first DNS name (a client's certificate names its FQDN)."""
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem.encode())
        names = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except (ValueError, x509.ExtensionNotFound):
        return hostname
    return hostname if hostname in names or not names else names[0]


def check_https(ctx: CheckContext) -> list[CheckResult]:
    """nginx answers with the machine's certificate, wants the token, redirects HTTP and
    passes websockets through."""
    group = "https"
    if not ctx.loaded.profile.jupyter.enabled or ctx.address is None:
        reason = "jupyter.enabled is false" if ctx.address else "ports not reachable"
        return [CheckResult("https: nginx in front of Jupyter", SKIPPED, reason, group=group)]
    cert_pem = ctx.target.run(f"cat {TLS_CERT}").stdout
    name = certificate_name(cert_pem, ctx.target.run("hostname").stdout.strip())
    token_value = jupyter_token(ctx)
    results = []
    try:
        context = _tls_context(cert_pem)
        answer = http_request(
            ctx.address(443), "/api/status", tls=context, server_name=name, timeout=60
        )
        served = ssl.DER_cert_to_PEM_cert(answer.peer_cert or b"").strip()
        same = served.split() == cert_pem.strip().split()
        results.append(
            _result(
                "https: valid certificate chain for the machine's name",
                same,
                f"TLS to {name} verified against {TLS_CERT}"
                + ("" if same else "; but nginx served another certificate"),
                group,
            )
        )
        results.append(
            _result(
                "https: a request without the token is refused",
                answer.status in (401, 403),
                f"GET /api/status without token -> HTTP {answer.status}",
                group,
            )
        )
        authorised = http_request(
            ctx.address(443),
            "/api/status",
            {"Authorization": f"token {token_value}"},
            tls=context,
            server_name=name,
        )
        results.append(
            _result(
                "https: the first-boot token opens Jupyter",
                authorised.status == 200 and bool(token_value),
                f"GET /api/status with token -> HTTP {authorised.status}",
                group,
            )
        )
        upgrade = http_request(
            ctx.address(443),
            "/api/events/subscribe",
            {
                "Authorization": f"token {token_value}",
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "ZmFjdG9yeS12YWxpZGF0ZQ==",
                "Sec-WebSocket-Version": "13",
            },
            tls=context,
            server_name=name,
        )
        results.append(
            _result(
                "https: websockets pass through nginx",
                upgrade.status == 101,
                f"websocket upgrade -> HTTP {upgrade.status}",
                group,
            )
        )
    except (OSError, ssl.SSLError, ConnectionError, ValueError) as error:
        results.append(
            CheckResult(
                "https: valid certificate chain for the machine's name",
                FAILED,
                f"{type(error).__name__}: {error}",
                group=group,
            )
        )
    try:
        plain = http_request(ctx.address(80), "/lab", server_name=name)
        location = plain.headers.get("location", "")
        ok = plain.status in (301, 308) and location.startswith(f"https://{name}/")
        detail = f"GET http://{name}/lab -> HTTP {plain.status} {location}"
    except (OSError, ConnectionError) as error:
        ok, detail = False, f"port 80: {error}"
    results.append(_result("https: plain HTTP redirects to HTTPS", ok, detail, group))
    return results


def _accepted_tcp_ports(ruleset: dict) -> tuple[str | None, set[int]]:
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
    group = "firewall"
    profile = ctx.loaded.profile
    wanted = set(profile.open_ports())
    results = []
    if profile.security.firewall:
        listed = ctx.target.run("sudo nft -j list ruleset")
        try:
            policy, accepted = _accepted_tcp_ports(json.loads(listed.stdout or "{}"))
        except json.JSONDecodeError:
            policy, accepted = None, set()
        results.append(
            _result(
                "firewall: inbound dropped except the profile's ports",
                policy == "drop" and accepted == wanted,
                f"input policy {policy}; accepts TCP {sorted(accepted)}; profile {sorted(wanted)}",
                group,
            )
        )
    listening = set()
    for line in ctx.target.run("ss -Htln").stdout.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        if not re.match(r"^(127\.|\[::1\]|\[::ffff:127\.)", address):
            listening.add(int(port))
    expected = {22} | ({80, 443} if profile.jupyter.enabled else set())
    expected |= {9100} if profile.monitoring.enabled else set()
    unexpected, missing = listening - wanted, expected - listening
    results.append(
        _result(
            "firewall: only the listed ports listen",
            not unexpected and not missing,
            f"listening beyond loopback: {sorted(listening)}"
            + (f"; not in the profile: {sorted(unexpected)}" if unexpected else "")
            + (f"; not listening: {sorted(missing)}" if missing else ""),
            group,
        )
    )
    if ctx.throwaway_vm and ctx.address and ctx.unlisted_port and profile.security.firewall:
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
            return CheckResult(name, FAILED, "the probe listener did not start", group="firewall")
        try:
            answer = http_request(ctx.address(port), "/", timeout=8)
            return CheckResult(
                name, FAILED, f"answered HTTP {answer.status} from outside", group="firewall"
            )
        except (OSError, ConnectionError) as error:
            return _result(
                name, True, f"inside: HTTP 200; outside: {type(error).__name__}", "firewall"
            )
    finally:
        ctx.target.run(f"sudo systemctl stop factory-probe-{port}")


def check_monitoring(ctx: CheckContext) -> list[CheckResult]:
    group = "monitoring"
    profile = ctx.loaded.profile
    try:
        if profile.monitoring.enabled and ctx.address is not None:
            where = "from outside on port 9100"
            body = http_request(ctx.address(9100), "/metrics").body
        else:
            where = "on 127.0.0.1:9100"
            body = ctx.target.run("curl -s -m 20 http://127.0.0.1:9100/metrics").stdout
    except (OSError, ConnectionError) as error:
        where, body = f"failed: {error}", ""
    series = len(re.findall(r"^node_", body, re.M))
    results = [
        _result(
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
            _result(
                "monitoring: Prometheus scrapes its targets",
                bool(health) and all(h == "up" for h in health),
                f"target health: {health or 'no answer'}",
                group,
            )
        )
    return results


def check_audit(ctx: CheckContext) -> list[CheckResult]:
    group = "audit"
    days = ctx.loaded.profile.security.audit_retention_days
    active = ctx.target.run("systemctl is-active auditd").stdout.strip()
    rules = ctx.target.run("sudo auditctl -l").stdout
    keys = sorted(set(re.findall(r"-k (factory-[\w-]+)", rules)))
    results = [
        _result(
            "audit: auditd is active with the login, sudo and token rules",
            active == "active"
            and {"factory-login", "factory-sudo", "factory-jupyter-token"} <= set(keys),
            f"auditd {active}; rule keys {keys}",
            group,
        )
    ]
    sudo_events = ctx.target.run("sudo ausearch --input-logs -k factory-sudo --format text").stdout
    results.append(
        _result(
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
        _result(
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
        _result(
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
        _result(
            "audit: rules are locked and auditd never stops recording silently",
            enabled is not None and enabled.group(1) == "2" and not suspends,
            f"auditctl enabled {enabled.group(1) if enabled else 'unknown'} (2: locked); "
            + "; ".join(f"{k} {auditd.get(k, 'SUSPEND')}" for k in actions),
            group,
        )
    )
    if ctx.loaded.profile.jupyter.enabled:
        access = ctx.target.run(
            "sudo grep -c 'GET /api/' /var/log/nginx/jupyter-access.log"
        ).stdout.strip()
        results.append(
            _result(
                "audit: Jupyter access is logged",
                access not in ("", "0"),
                f"{access or 0} API request(s) in /var/log/nginx/jupyter-access.log",
                group,
            )
        )
    return results


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
        return _result(
            name,
            not pending,
            "; ".join(pending) or "apt's own lists hold no pending security update",
            "updates",
        )
    index = ctx.extra["security_index"]
    if index is None:
        return _result(name, False, "the image was built without a security suite", "updates")
    listing = ctx.target.run("dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\\n'")
    installed = updates.parse_dpkg_query(listing.stdout)
    pending = updates.pending_updates(installed, index)
    return _result(
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
    return _result(
        f"updates: automatic security updates are {'on' if wanted else 'off'}",
        on if wanted else off,
        "; ".join(detail),
        "updates",
    )


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
        _result(
            "services: run unprivileged",
            not bad,
            "; ".join(f"{unit} as {user or 'not running'}" for unit, user in owners.items()),
            "services",
        )
    ]


def check_image_hygiene(ctx: CheckContext) -> list[CheckResult]:
    """No private key, token or password from the build: secrets exist only where first boot
    makes them, and (on a fresh boot) were made by this boot."""
    group = "hygiene"
    problems = []
    # Patterns go on stdin: a command line holding them would land in the journal via sudo.
    found = ctx.target.run(
        f"sudo grep -rlI --exclude-dir=proc -f /dev/stdin {SCANNED_DIRS} 2>/dev/null",
        stdin=PRIVATE_KEY_MARK + "\n",
    ).stdout.split()
    allowed = {"/etc/factory/tls/jupyter.key"} | {
        p for p in found if re.match(r"^/etc/ssh/ssh_host_\w+_key$", p)
    }
    problems += [f"private key in {path}" for path in found if path not in allowed]
    token = jupyter_token(ctx)
    # The token travels on stdin, never on a command line (auditd records sudo's argv).
    tokens = ctx.target.run(
        f"sudo grep -rlIE -e 'JUPYTER_TOKEN=[0-9a-f]{{16,}}' {SCANNED_DIRS} 2>/dev/null; "
        f"sudo grep -rlIF -f /dev/stdin {SCANNED_DIRS} 2>/dev/null",
        stdin=token + "\n" if token else "JUPYTER_TOKEN=no-token-to-search\n",
    ).stdout.split()
    admin_home = ctx.target.run(f"getent passwd {ctx.loaded.profile.admin.user}").stdout
    token_files = {"/etc/factory/jupyter.env", admin_home.split(":")[5] + "/jupyter-token"}
    problems += [
        f"token in {path}"
        for path in sorted(set(tokens) - token_files)
        if not path.startswith(JUPYTER_RUNTIME)
    ]
    journal = ctx.target.run(
        "sudo bash -c 'exec 3<&0; journalctl -o cat --no-pager | grep -cF -f /dev/fd/3'",
        stdin=(token + "\n" if token else "") + PRIVATE_KEY_MARK + "\n",
    ).stdout.strip()
    if journal not in ("", "0"):
        problems.append(f"{journal} journal line(s) hold the token or a private key")
    passwords = ctx.target.run("sudo awk -F: '$2 !~ /^[!*]/ {print $1}' /etc/shadow").stdout.split()
    problems += [f"user {user} has a password" for user in passwords]
    if ctx.throwaway_vm:
        supplied = ctx.target.run("test -e /etc/factory/tls/client-supplied").ok
        jupyter = ctx.loaded.profile.jupyter.enabled
        paths = [
            p
            for p in FIRST_BOOT_SECRETS
            if (jupyter or "/factory/" not in p) and not (supplied and "/tls/" in p)
        ]
        stamps = ctx.target.run(
            "awk '/^btime/ {print $2}' /proc/stat; "
            f"sudo stat -c '%n %W %Y' {' '.join(map(shell_word, paths))}"
        ).stdout.split("\n")
        boot = int(stamps[0] or 0)
        for line in filter(None, stamps[1:]):
            path, born, modified = line.split()
            made = int(born) if born not in ("0", "-") else int(modified)
            if made < boot:
                problems.append(f"{path} predates this boot")
        missing = len(paths) - len([s for s in stamps[1:] if s])
        if missing:
            problems.append(f"{missing} first-boot secret(s) missing")
    return [
        _result(
            "hygiene: no private key, token or password from the build",
            not problems,
            "; ".join(problems)
            or f"keys only in first-boot files; no token elsewhere; no passwords ({SCANNED_DIRS})",
            group,
        )
    ]
