"""sshd: no root or password logins (by its effective config and by trying them), tight login
limits, and the admin holds exactly the profile's keys."""

from __future__ import annotations

from factory.validate.context import CheckContext, CheckResult, result

GROUP = "ssh"
# Never a real password of the image: the probe proves that passwords are refused at all.
PROBE_PASSWORD = "factory-probe-password"
# TCP forwarding stays on: the validator reaches Jupyter through it.
LOGIN_LIMITS = {"x11forwarding": "no", "maxauthtries": "3", "logingracetime": "30"}


def check_ssh_hardening(ctx: CheckContext) -> list[CheckResult]:
    config = ctx.target.run("sudo sshd -T").stdout.lower()
    settings = dict(line.split(" ", 1) for line in config.splitlines() if " " in line)
    results = [
        result(
            "ssh: sshd denies root login",
            settings.get("permitrootlogin") == "no",
            f"permitrootlogin {settings.get('permitrootlogin')}",
            GROUP,
        ),
        result(
            "ssh: sshd denies passwords",
            settings.get("passwordauthentication") == "no",
            f"passwordauthentication {settings.get('passwordauthentication')}",
            GROUP,
        ),
        result(
            "ssh: no X11 forwarding, 3 tries and 30 s to log in",
            all(settings.get(k) == v for k, v in LOGIN_LIMITS.items()),
            ", ".join(f"{k} {settings.get(k)}" for k in LOGIN_LIMITS),
            GROUP,
        ),
    ]
    # Logins are tried only on a VM booted for this run: the root probe authorises a key.
    if ctx.throwaway_vm and hasattr(ctx.target, "try_login"):
        outcome = _root_login_with_authorised_key(ctx)
        results.append(
            result(
                "ssh: root login with an authorised key is refused",
                outcome.startswith("refused"),
                outcome,
                GROUP,
            )
        )
        admin = ctx.loaded.profile.admin.user
        outcome = ctx.target.try_login(admin, password=PROBE_PASSWORD)
        results.append(
            result("ssh: password login is refused", outcome.startswith("refused"), outcome, GROUP)
        )
    admin = ctx.loaded.profile.admin
    keys = ctx.target.run(f"sudo cat ~{admin.user}/.ssh/authorized_keys").stdout
    have = {" ".join(k.split()[:2]) for k in keys.splitlines() if k.strip()}
    want = {" ".join(k.split()[:2]) for k in admin.ssh_keys}
    results.append(
        result(
            f"ssh: {admin.user} has exactly the profile's keys",
            have == want,
            f"{len(have)} key(s) installed, {len(want)} in the profile",
            GROUP,
        )
    )
    return results


def _root_login_with_authorised_key(ctx: CheckContext) -> str:
    """Authorise the validator's own key for root, then try to log in as root with it."""
    target = ctx.target
    target.run(
        "sudo install -d -m 700 /root/.ssh && sudo tee -a /root/.ssh/authorized_keys >/dev/null",
        stdin=target.public_key() + "\n",
    )
    try:
        return target.try_login("root", key=target.key_file)
    finally:
        target.run("sudo rm -f /root/.ssh/authorized_keys")
