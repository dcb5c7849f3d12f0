"""Record what a validation run saw on the machine, so that unit tests can replay it with
ScriptedTarget instead of booting a VM. Set FACTORY_RECORD_COMMANDS=path.json to record."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any

from factory.validate.target import CommandResult, login_key, request_key
from factory.validate.web import Answer

RECORD_ENV = "FACTORY_RECORD_COMMANDS"


def recording_path() -> Path | None:
    """Where this run records to, or None when it does not record."""
    value = os.environ.get(RECORD_ENV, "")
    return Path(value) if value else None


class Recording:
    """{command: {stdout, stderr, exit_code}} plus what checks met outside the target (login
    attempts, HTTP answers), written to JSON after every entry so a crash keeps what came
    before."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.document: dict[str, dict[str, Any]] = {"commands": {}, "logins": {}, "requests": {}}

    def command(self, command: str, result: CommandResult) -> None:
        self.document["commands"][command] = {
            "stdout": result.stdout,
            "stderr": result.stderr,
            "exit_code": result.exit_code,
        }
        self.save()

    def entry(self, section: str, key: str, value: Any) -> None:
        self.document.setdefault(section, {})[key] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.document, indent=1, sort_keys=True) + "\n")


class RecordingTarget:
    """A target that passes everything to the real one and records its answers: commands,
    HTTP requests to the machine's ports and login attempts."""

    def __init__(self, inner: Any, recording: Recording) -> None:
        self.inner = inner
        self.recording = recording
        self.user = inner.user
        self.description = inner.description
        self.key_file = getattr(inner, "key_file", None)

    def public_key(self) -> str:
        return self.inner.public_key()

    def request(
        self, port: int, path: str, headers: dict[str, str] | None = None, **options: Any
    ) -> Answer:
        key = request_key(port, path, headers)
        try:
            answer = self.inner.request(port, path, headers, **options)
        except OSError as error:
            self.recording.entry("requests", key, {"error": [type(error).__name__, str(error)]})
            raise
        cert = ssl.DER_cert_to_PEM_cert(answer.peer_cert) if answer.peer_cert else None
        recorded = {"status": answer.status, "headers": answer.headers, "body": answer.body}
        self.recording.entry("requests", key, {**recorded, "peer_cert": cert})
        return answer

    def try_login(self, user: str, key: Path | None = None, password: str | None = None) -> str:
        outcome = self.inner.try_login(user, key=key, password=password)
        self.recording.entry("logins", login_key(user, key, password), outcome)
        return outcome

    def run(self, command: str, stdin: str | None = None, timeout: float = 600) -> CommandResult:
        result = self.inner.run(command, stdin=stdin, timeout=timeout)
        self.recording.command(command, result)
        return result

    def close(self) -> None:
        self.recording.save()
        self.inner.close()
