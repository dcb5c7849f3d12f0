"""Where checks run: an SSH session (paramiko) with a pinned host key, or this machine."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import getpass
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from factory.errors import FactoryError

logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class SSHTarget:
    """A logged-in SSH session to the machine under test."""

    def __init__(self, client: paramiko.SSHClient, user: str, description: str) -> None:
        self.client = client
        self.user = user
        self.description = description

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


class LocalTarget:
    """The machine the validator runs on, for IT checking a client host from its own shell."""

    def __init__(self) -> None:
        self.user = getpass.getuser()
        self.description = f"{self.user}@localhost (no SSH)"

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


Target = SSHTarget | LocalTarget


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
) -> SSHTarget:
    """Log in, retrying until `deadline` (time.monotonic) while the machine boots."""
    if host_keys:
        client_factory = lambda: pinned_client(host, port, host_keys)  # noqa: E731
    else:

        def client_factory() -> paramiko.SSHClient:
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
            return SSHTarget(client, user, f"{user}@{host}:{port}")
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


def try_login(
    host: str,
    port: int,
    user: str,
    host_keys: list[str],
    *,
    key_file: Path | None = None,
    password: str | None = None,
) -> str:
    """Attempt one login with a key or a password; return 'accepted' or why it was refused."""
    client = pinned_client(host, port, host_keys)
    try:
        client.connect(
            host,
            port=port,
            username=user,
            key_filename=str(key_file) if key_file else None,
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
