"""An image free of build secrets: no build user or payload, and no private key, token or
password except where first boot makes them (and, on a fresh boot, made by this boot)."""

from __future__ import annotations

import re

from factory.image_layout import (
    JUPYTER_HOME,
    JUPYTER_TOKEN_FILE,
    PAYLOAD_DIR,
    TLS_CLIENT_SUPPLIED,
    TLS_KEY,
)
from factory.profile import BUILD_USER
from factory.validate.context import CheckContext, CheckResult, jupyter_token, quote, result

GROUP = "hygiene"
FIRST_BOOT_SECRETS = [
    "/etc/ssh/ssh_host_ed25519_key",
    "/etc/ssh/ssh_host_rsa_key",
    str(JUPYTER_TOKEN_FILE),
    str(TLS_KEY),
]
PRIVATE_KEY_MARK = "PRIVATE KEY-----"
SCANNED_DIRS = "/etc /root /home /srv /var /tmp /opt/factory /usr/local"
# Where the running Jupyter server keeps its own connection files (mode 0600, its user).
JUPYTER_RUNTIME = f"{JUPYTER_HOME}/.local/share/jupyter/runtime/"


def check_build_credentials_removed(ctx: CheckContext) -> list[CheckResult]:
    leftovers = []
    if ctx.target.run(f"getent passwd {BUILD_USER}").ok:
        leftovers.append(f"user {BUILD_USER}")
    probe = ctx.target.run(
        f"sudo sh -c 'ls -d /home/{BUILD_USER} {PAYLOAD_DIR} "
        f"2>/dev/null; grep -rl {BUILD_USER} /etc/sudoers /etc/sudoers.d /etc/passwd /etc/shadow "
        "/etc/group 2>/dev/null'"
    )
    leftovers += [line for line in probe.stdout.splitlines() if line.strip()]
    return [
        result(
            "hygiene: no build credentials left",
            not leftovers,
            "; ".join(leftovers) or f"no {BUILD_USER} user, home, sudoers or payload",
            GROUP,
        )
    ]


def check_image_hygiene(ctx: CheckContext) -> list[CheckResult]:
    """No private key, token or password from the build."""
    token = jupyter_token(ctx)
    problems = _stray_private_keys(ctx) + _stray_tokens(ctx, token)
    journal = ctx.target.run(
        "sudo bash -c 'exec 3<&0; journalctl -o cat --no-pager | grep -cF -f /dev/fd/3'",
        stdin=(token + "\n" if token else "") + PRIVATE_KEY_MARK + "\n",
    ).stdout.strip()
    if journal not in ("", "0"):
        problems.append(f"{journal} journal line(s) hold the token or a private key")
    passwords = ctx.target.run("sudo awk -F: '$2 !~ /^[!*]/ {print $1}' /etc/shadow").stdout.split()
    problems += [f"user {user} has a password" for user in passwords]
    if ctx.throwaway_vm:
        problems += _secrets_not_from_this_boot(ctx)
    return [
        result(
            "hygiene: no private key, token or password from the build",
            not problems,
            "; ".join(problems)
            or f"keys only in first-boot files; no token elsewhere; no passwords ({SCANNED_DIRS})",
            GROUP,
        )
    ]


def _stray_private_keys(ctx: CheckContext) -> list[str]:
    # Patterns go on stdin: a command line holding them would land in the journal via sudo.
    found = ctx.target.run(
        f"sudo grep -rlI --exclude-dir=proc -f /dev/stdin {SCANNED_DIRS} 2>/dev/null",
        stdin=PRIVATE_KEY_MARK + "\n",
    ).stdout.split()
    allowed = {str(TLS_KEY)} | {p for p in found if re.match(r"^/etc/ssh/ssh_host_\w+_key$", p)}
    return [f"private key in {path}" for path in found if path not in allowed]


def _stray_tokens(ctx: CheckContext, token: str) -> list[str]:
    # The token travels on stdin, never on a command line (auditd records sudo's argv).
    tokens = ctx.target.run(
        f"sudo grep -rlIE -e 'JUPYTER_TOKEN=[0-9a-f]{{16,}}' {SCANNED_DIRS} 2>/dev/null; "
        f"sudo grep -rlIF -f /dev/stdin {SCANNED_DIRS} 2>/dev/null",
        stdin=token + "\n" if token else "JUPYTER_TOKEN=no-token-to-search\n",
    ).stdout.split()
    admin_home = ctx.target.run(f"getent passwd {ctx.loaded.profile.admin.user}").stdout
    token_files = {str(JUPYTER_TOKEN_FILE), admin_home.split(":")[5] + "/jupyter-token"}
    return [
        f"token in {path}"
        for path in sorted(set(tokens) - token_files)
        if not path.startswith(JUPYTER_RUNTIME)
    ]


def _secrets_not_from_this_boot(ctx: CheckContext) -> list[str]:
    """First-boot secrets that are missing, or older than this boot (baked into the image)."""
    supplied = ctx.target.run(f"test -e {TLS_CLIENT_SUPPLIED}").ok
    jupyter = ctx.loaded.profile.jupyter.enabled
    paths = [
        p
        for p in FIRST_BOOT_SECRETS
        if (jupyter or "/factory/" not in p) and not (supplied and "/tls/" in p)
    ]
    stamps = ctx.target.run(
        "awk '/^btime/ {print $2}' /proc/stat; "
        f"sudo stat -c '%n %W %Y' {' '.join(map(quote, paths))}"
    ).stdout.split("\n")
    boot = int(stamps[0] or 0)
    problems = []
    for line in filter(None, stamps[1:]):
        path, born, modified = line.split()
        made = int(born) if born not in ("0", "-") else int(modified)
        if made < boot:
            problems.append(f"{path} predates this boot")
    missing = len(paths) - len([s for s in stamps[1:] if s])
    if missing:
        problems.append(f"{missing} first-boot secret(s) missing")
    return problems
