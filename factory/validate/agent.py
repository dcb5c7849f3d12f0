"""The QEMU guest agent's channel, the way libvirt and Proxmox reach a guest: read a file, run a
command as root, and so let the validator in on a disk booted without a seed."""

from __future__ import annotations

import base64
import json
import shlex
import socket
import time
from pathlib import Path

from factory.errors import FactoryError


class GuestAgent:
    """A client of the QEMU guest agent's JSON protocol on a unix socket."""

    def __init__(self, path: Path, deadline: float) -> None:
        self._sock: socket.socket | None = None
        self._buffer = b""
        while True:
            try:
                self._connect(path)
                return
            except OSError as error:
                self.close()
                if time.monotonic() > deadline:
                    raise FactoryError(
                        f"the guest agent did not answer on {path} ({error}); the image needs "
                        "qemu-guest-agent running"
                    ) from None
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

    def run(self, argv: list[str], timeout: float = 120) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of `argv` run as root in the guest."""
        started = self.call("guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})
        assert isinstance(started, dict)
        deadline = time.monotonic() + timeout
        while True:
            status = self.call("guest-exec-status", pid=started["pid"])
            assert isinstance(status, dict)
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise FactoryError(f"the guest agent's `{shlex.join(argv)}` ran past {timeout} s")
            time.sleep(0.5)

        def text(key: str) -> str:
            return base64.b64decode(status.get(key, "")).decode(errors="replace")

        return int(status.get("exitcode", -1)), text("out-data"), text("err-data")


def admit_login(agent: GuestAgent, user: str, public_key: str) -> None:
    """Create `user`: key-only, passwordless sudo, the same login a NoCloud seed would give.
    It lives only on the validation VM's throwaway overlay."""
    home = f"/home/{user}"
    script = "\n".join(
        [
            "set -eu",
            f"useradd --create-home --shell /bin/bash {user}",
            f"passwd --lock {user} >/dev/null",
            f"install -d -m 700 -o {user} -g {user} {home}/.ssh",
            f"printf '%s\\n' {shlex.quote(public_key)} > {home}/.ssh/authorized_keys",
            f"chown {user}: {home}/.ssh/authorized_keys",
            f"chmod 600 {home}/.ssh/authorized_keys",
            f"printf '%s\\n' '{user} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-{user}",
            f"chmod 440 /etc/sudoers.d/90-{user}",
        ]
    )
    code, _, errors = agent.run(["/bin/sh", "-c", script])
    if code != 0:
        last = (errors.strip().splitlines() or ["no output"])[-1]
        raise FactoryError(f"the guest agent could not add the validator's login: {last}")
