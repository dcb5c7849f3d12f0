"""The delivered disk booted as an importer boots it: no seed disk, so cloud-init falls back to
no datasource. It must come up, print its host keys, answer on the ports it serves, and create
no account beyond the profile's. There is no login without a seed, so the accounts are read
through the QEMU guest agent, the channel libvirt and Proxmox add for it."""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path

from factory.profile import LoadedProfile
from factory.validate.boot import boot_delivery
from factory.validate.context import PASSED, CheckResult, result
from factory.validate.web import http_request, unverified_tls

GROUP = "importer"
FIRST_HUMAN_UID, NOBODY_UID = 1000, 65534


class GuestAgent:
    """A client of the QEMU guest agent's JSON protocol on a unix socket."""

    def __init__(self, path: Path, deadline: float) -> None:
        self._sock: socket.socket | None = None
        self._buffer = b""
        while True:
            try:
                self._connect(path)
                return
            except OSError:
                self.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(3)

    def _connect(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.settimeout(10)
        self._sock.connect(str(path))
        token = int(time.time()) & 0x7FFFFFFF
        # guest-sync discards whatever an earlier client left half-read.
        self._send({"execute": "guest-sync", "arguments": {"id": token}})
        while self._reply() != token:
            pass

    def _send(self, message: dict) -> None:
        assert self._sock is not None
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    def _reply(self) -> object:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the guest agent closed the channel")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer = json.loads(line)
        if "error" in answer:
            raise OSError(answer["error"].get("desc", "guest agent error"))
        return answer.get("return")

    def call(self, command: str, **arguments: object) -> object:
        self._send({"execute": command, "arguments": arguments})
        return self._reply()

    def read_file(self, path: str) -> str:
        handle = self.call("guest-file-open", path=path, mode="r")
        data = b""
        try:
            while True:
                chunk = self.call("guest-file-read", handle=handle, count=65536)
                assert isinstance(chunk, dict)
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    break
        finally:
            self.call("guest-file-close", handle=handle)
        return data.decode(errors="replace")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


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


def check_importer_boot(
    disk: Path,
    loaded: LoadedProfile,
    memory_mib: int,
    cpus: int,
    accelerator: str,
    cpu_model: str | None,
    log=print,
) -> list[CheckResult]:
    """Boot `disk` without a seed and check what an importer meets."""
    ports = served_ports(loaded)
    results = []
    with boot_delivery(
        disk,
        memory_mib,
        cpus,
        accelerator,
        cpu_model=cpu_model,
        restrict_network=True,
        forward_ports=ports,
        seed=False,
        log=log,
    ) as vm:
        results.append(
            CheckResult(
                "importer: boots without a seed and prints its host keys",
                PASSED,
                f"{len(vm.host_keys)} host key(s) on the console after {vm.boot_seconds:.0f} s",
                group=GROUP,
            )
        )
        deadline = time.monotonic() + 300
        answered, silent = [], []
        for port in ports:
            try:
                answered.append(
                    f"{port}: {_answers(port, ('127.0.0.1', vm.forwards[port]), deadline)}"
                )
            except ConnectionError as error:
                silent.append(f"{port}: {error}")
        results.append(ports_result(ports, answered, silent))
        assert vm.agent_socket is not None
        agent = GuestAgent(vm.agent_socket, time.monotonic() + 300)
        try:
            accounts = human_accounts(agent.read_file("/etc/passwd"))
        finally:
            agent.close()
        results.append(accounts_result(accounts, loaded.profile.admin.user))
    return results
