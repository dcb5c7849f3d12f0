"""The delivered disk booted as an importer boots it: no seed disk, so cloud-init finds no
datasource and stays off, and a disk made larger than delivered. It must come up, print its
host keys, answer on the ports it serves, grow its root file system to the larger disk, and
create no account beyond the profile's. These checks run first, before the validator is let in
through the QEMU guest agent (the channel libvirt and Proxmox add), so nobody has logged in
yet; the accounts are read through the agent too."""

from __future__ import annotations

import socket
import time

from factory.profile import LoadedProfile
from factory.validate.agent import GuestAgent
from factory.validate.boot import BootedVM
from factory.validate.context import PASSED, CheckResult, result
from factory.validate.web import http_request, unverified_tls

GROUP = "importer"
FIRST_HUMAN_UID, NOBODY_UID = 1000, 65534


def served_ports(loaded: LoadedProfile) -> list[int]:
    """The ports the image itself serves (the profile's own open ports may have no listener
    until the client installs one)."""
    profile = loaded.profile
    ports = [22]
    if profile.jupyter.enabled:
        ports += [80, 443]
    if profile.monitoring.enabled:
        ports.append(9100)
    return ports


def _answers(port: int, address: tuple[str, int], deadline: float) -> str:
    """What the service on `port` answered, or raise when it does not."""
    while True:
        try:
            if port == 22:
                with socket.create_connection(address, timeout=15) as sock:
                    banner = sock.recv(256).decode(errors="replace").strip()
                if not banner.startswith("SSH-"):
                    raise ConnectionError(f"no SSH banner (got {banner[:40]!r})")
                return banner
            # First boot's certificate is self-signed; here only an answer is asked for.
            tls = unverified_tls() if port == 443 else None
            answer = http_request(address, "/", tls=tls, timeout=15)
            return f"HTTP {answer.status}"
        except (OSError, ConnectionError) as error:
            if time.monotonic() > deadline:
                raise ConnectionError(str(error) or type(error).__name__) from None
            time.sleep(3)


def human_accounts(passwd: str) -> dict[str, str]:
    """{user: login shell} of the accounts a person could log in as (UID 1000 and up)."""
    accounts = {}
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) == 7 and fields[2].isdigit():
            uid = int(fields[2])
            if FIRST_HUMAN_UID <= uid < NOBODY_UID:
                accounts[fields[0]] = fields[6]
    return accounts


def ports_result(ports: list[int], answered: list[str], silent: list[str]) -> CheckResult:
    """Every port the image serves answered (`answered`, `silent`: "port: what happened")."""
    return result(
        f"importer: answers on ports {', '.join(map(str, ports))}",
        not silent,
        "; ".join(silent + answered),
        GROUP,
    )


def accounts_result(accounts: dict[str, str], admin: str) -> CheckResult:
    """The image holds the profile's admin and no other account a person could log in as."""
    extra = sorted(set(accounts) - {admin})
    return result(
        "importer: no account beyond the profile's",
        not extra and admin in accounts,
        (f"unexpected: {', '.join(extra)}; " if extra else "")
        + f"login accounts: {', '.join(sorted(accounts)) or 'none'} (profile: {admin})",
        GROUP,
    )


def growth_result(vm: BootedVM, agent: GuestAgent) -> CheckResult:
    """The root file system is larger than the delivered disk: it grew into the larger one."""
    code, out, err = agent.run(["/usr/bin/findmnt", "-bnvo", "SIZE", "/"])
    size = int(out.strip()) if code == 0 and out.strip().isdigit() else 0
    gib = 2**30
    return result(
        "importer: the root file system grows to fill a larger disk",
        size > vm.delivered_disk_bytes,
        f"root {size / gib:.2f} GiB on a {vm.disk_bytes / gib:.2f} GiB disk (delivered "
        f"{vm.delivered_disk_bytes / gib:.2f} GiB)" + (f"; findmnt: {err.strip()}" if code else ""),
        GROUP,
    )


def check_importer(vm: BootedVM, loaded: LoadedProfile, agent: GuestAgent) -> list[CheckResult]:
    """What an importer meets on `vm`, booted without a seed, before anyone has logged in."""
    ports = served_ports(loaded)
    results = [
        CheckResult(
            "importer: boots without a seed and prints its host keys",
            PASSED,
            f"{len(vm.host_keys)} host key(s) on the console after {vm.boot_seconds:.0f} s",
            group=GROUP,
        )
    ]
    deadline = time.monotonic() + 300
    answered, silent = [], []
    for port in ports:
        try:
            answered.append(f"{port}: {_answers(port, ('127.0.0.1', vm.forwards[port]), deadline)}")
        except ConnectionError as error:
            silent.append(f"{port}: {error}")
    results.append(ports_result(ports, answered, silent))
    results.append(growth_result(vm, agent))
    accounts = human_accounts(agent.read_file("/etc/passwd"))
    results.append(accounts_result(accounts, loaded.profile.admin.user))
    return results
