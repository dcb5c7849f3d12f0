"""Where checks run: an SSH session (paramiko) with a pinned host key, this machine, or a
recording (ScriptedTarget, for unit tests). Each backend runs commands, reaches the machine's
TCP ports and, over SSH, tries logins."""

from __future__ import annotations

import base64
import builtins
import concurrent.futures
import contextlib
import getpass
import logging
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from factory.errors import FactoryError
from factory.validate.web import Answer, http_request

logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def request_key(port: int, path: str, headers: dict[str, str] | None = None) -> str:
    """How a recording names one HTTP request: port, path and the header names it sent."""
    names = ",".join(sorted(headers or {}))
    return f"{port} {path}" + (f" [{names}]" if names else "")


def login_key(user: str, key: Path | None, password: str | None) -> str:
    """How a recording names one login attempt."""
    return f"{user} with {'a key' if key else 'a password' if password else 'nothing'}"


class _ReachesPorts:
    """HTTP to the machine's TCP ports, wherever `address` says they are."""

    def address(self, port: int) -> tuple[str, int]:
        raise NotImplementedError

    def request(
        self, port: int, path: str, headers: dict[str, str] | None = None, **options: Any
    ) -> Answer:
        """GET `path` on `port`; options are http_request's (tls, server_name, timeout)."""
        return http_request(self.address(port), path, headers, **options)


class SSHTarget(_ReachesPorts):
    """A logged-in SSH session to the machine under test."""

    def __init__(
        self,
        client: paramiko.SSHClient,
        user: str,
        description: str,
        *,
        host: str = "127.0.0.1",
        port: int = 22,
        new_client: Callable[[], paramiko.SSHClient] | None = None,
        key_file: Path | None = None,
        forwards: dict[int, int] | None = None,
    ) -> None:
        self.client = client
        self.user = user
        self.description = description
        self.host, self.port = host, port
        self._new_client = new_client or paramiko.SSHClient
        self.key_file = key_file  # the key this session logged in with, if it was given one
        self.forwards = forwards  # guest TCP port -> port on `host`, for a VM behind NAT

    def address(self, port: int) -> tuple[str, int]:
        return (self.host, self.forwards[port] if self.forwards is not None else port)

    def public_key(self) -> str:
        """The public half of the key this session logged in with."""
        if self.key_file is None:
            raise FactoryError("this SSH session logged in without a key file")
        key = paramiko.PKey.from_path(self.key_file)
        return f"{key.get_name()} {key.get_base64()}"

    def try_login(self, user: str, key: Path | None = None, password: str | None = None) -> str:
        """Attempt one more login with a key or a password, checking the same host keys;
        return 'accepted' or why it was refused."""
        client = self._new_client()
        try:
            client.connect(
                self.host,
                port=self.port,
                username=user,
                key_filename=str(key) if key else None,
                password=password,
                allow_agent=False,
                look_for_keys=False,
                timeout=15,
                banner_timeout=30,
            )
            return "accepted"
        except paramiko.BadAuthenticationType as error:
            return f"refused (server allows only {', '.join(error.allowed_types)})"
        except paramiko.AuthenticationException as error:
            return f"refused ({error})"
        finally:
            client.close()

    def run(self, command: str, stdin: str | None = None, timeout: float = 600) -> CommandResult:
        channel_in, channel_out, channel_err = self.client.exec_command(command, timeout=timeout)
        if stdin is not None:
            channel_in.write(stdin)
        channel = channel_in.channel
        channel.shutdown_write()  # commands that read stdin get EOF, never a hang
        # stderr drains beside stdout, so a chatty stderr cannot fill its window and stall.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            err_read = pool.submit(channel_err.read)
            try:
                out = channel_out.read()
                err = err_read.result()
            except TimeoutError:
                channel.close()
                return CommandResult(124, "", f"no output for {timeout:.0f} s; stopped")
        if not channel.status_event.wait(timeout):
            channel.close()
            return CommandResult(124, out.decode(errors="replace"), "no exit status; stopped")
        status = channel.recv_exit_status()
        return CommandResult(status, out.decode(errors="replace"), err.decode(errors="replace"))

    def close(self) -> None:
        self.client.close()


class LocalTarget(_ReachesPorts):
    """The machine the validator runs on, for IT checking a client host from its own shell."""

    def __init__(self) -> None:
        self.user = getpass.getuser()
        self.description = f"{self.user}@localhost (no SSH)"

    def address(self, port: int) -> tuple[str, int]:
        return ("127.0.0.1", port)

    def run(self, command: str, stdin: str | None = None, timeout: float = 600) -> CommandResult:
        process = subprocess.Popen(
            ["bash", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout stops all of it
        )
        try:
            out, err = process.communicate((stdin or "").encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return CommandResult(124, "", f"timed out after {timeout:.0f} s")
        return CommandResult(
            process.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        )

    def close(self) -> None:
        pass


class ScriptedTarget:
    """Answers from a recording (see recording.py) instead of a machine: commands, HTTP
    answers and login attempts. Anything the recording lacks raises KeyError, so a check that
    asks something new fails its test instead of passing on an empty answer."""

    def __init__(self, recording: dict[str, Any], description: str = "scripted") -> None:
        self.user = "factory-validate"
        self.description = description
        self.commands = {
            command: CommandResult(answer["exit_code"], answer["stdout"], answer["stderr"])
            for command, answer in recording.get("commands", {}).items()
        }
        self.requests: dict[str, dict] = dict(recording.get("requests", {}))
        self.logins: dict[str, str] = dict(recording.get("logins", {}))
        self.key_file = Path("recorded-validator-key")
        self.ran: list[str] = []

    def run(self, command: str, stdin: str | None = None, timeout: float = 600) -> CommandResult:
        self.ran.append(command)
        if command not in self.commands:
            raise KeyError(f"no recorded answer for the command {command!r}")
        return self.commands[command]

    def answer(self, command: str, **changes: Any) -> None:
        """Change one recorded answer (stdout=, stderr=, exit_code=), for a failing case."""
        old = self.commands[command]
        self.commands[command] = CommandResult(
            changes.get("exit_code", old.exit_code),
            changes.get("stdout", old.stdout),
            changes.get("stderr", old.stderr),
        )

    def request(
        self, port: int, path: str, headers: dict[str, str] | None = None, **options: Any
    ) -> Answer:
        recorded = self.requests[request_key(port, path, headers)]
        if "error" in recorded:
            kind, message = recorded["error"]
            error = getattr(builtins, kind, None)
            raise (error if isinstance(error, type) and issubclass(error, OSError) else OSError)(
                message
            )
        cert = recorded.get("peer_cert")
        return Answer(
            recorded["status"],
            dict(recorded["headers"]),
            recorded["body"],
            ssl.PEM_cert_to_DER_cert(cert) if cert else None,
        )

    def public_key(self) -> str:
        return "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIRecordedValidatorKey factory-validate"

    def try_login(self, user: str, key: Path | None = None, password: str | None = None) -> str:
        return self.logins[login_key(user, key, password)]

    def close(self) -> None:
        pass


Target = SSHTarget | LocalTarget | ScriptedTarget


def pinned_client(host: str, port: int, host_keys: list[str]) -> paramiko.SSHClient:
    """An SSHClient that accepts only the given host keys (never AutoAddPolicy)."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    name = host if port == 22 else f"[{host}]:{port}"
    pinned = 0
    for line in host_keys:
        key_type, blob = line.split()[:2]
        try:
            key = paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
        except paramiko.pkey.UnknownKeyType:
            continue  # e.g. ssh-dss, which paramiko no longer speaks; the others pin the host
        client.get_host_keys().add(name, key_type, key)
        pinned += 1
    if not pinned:
        raise FactoryError(f"none of the host keys {host_keys} can be used to pin the host")
    return client


def connect(
    host: str,
    port: int,
    user: str,
    key_file: Path | None,
    host_keys: list[str] | None,
    deadline: float,
    forwards: dict[int, int] | None = None,
) -> SSHTarget:
    """Log in, retrying until `deadline` (time.monotonic) while the machine boots. `forwards`
    maps the guest's TCP ports to ports on `host` (a VM behind QEMU's NAT)."""

    def client_factory() -> paramiko.SSHClient:
        if host_keys:
            return pinned_client(host, port, host_keys)
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        return client

    last_error: Exception | None = None
    while time.monotonic() < deadline:
        client = client_factory()
        try:
            client.connect(
                host,
                port=port,
                username=user,
                key_filename=str(key_file) if key_file else None,
                allow_agent=key_file is None,
                look_for_keys=key_file is None,
                timeout=15,
                banner_timeout=30,
                auth_timeout=30,
            )
            return SSHTarget(
                client,
                user,
                f"{user}@{host}:{port}",
                host=host,
                port=port,
                new_client=client_factory,
                key_file=key_file,
                forwards=forwards,
            )
        except paramiko.BadHostKeyException as error:
            client.close()
            raise FactoryError(
                f"{host}:{port} presented host key {error.key.get_name()} "
                f"{error.key.get_fingerprint().hex()} that is not the pinned one; refusing"
            ) from None
        except paramiko.SSHException as error:
            if "not found in known_hosts" in str(error):
                client.close()
                raise FactoryError(
                    f"{host}:{port} is not in ~/.ssh/known_hosts; verify its host key and add "
                    "it (ssh-keyscan output checked against the console) before validating"
                ) from None
            last_error = error
        except (TimeoutError, OSError, EOFError) as error:
            last_error = error
        client.close()
        time.sleep(3)
    raise FactoryError(f"cannot log in to {user}@{host}:{port}: {last_error}")
