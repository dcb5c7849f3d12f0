"""What every check shares: the result type, the context a check reads, and small helpers
that ask the machine for the facts several checks need."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from factory.escape import shell_word
from factory.export import XML_FORBIDDEN
from factory.image_layout import JUPYTER_TOKEN_FILE
from factory.profile import LoadedProfile
from factory.validate.target import Target

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
# Terminal escape sequences (CSI colours, OSC titles, two-character escapes), as nbclient's
# tracebacks and other tools' stderr carry them.
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[0-~])")


def printable_detail(text: str) -> str:
    """A check's detail without terminal escapes or the characters XML cannot hold, so every
    report (JSON, JUnit XML, HTML) can carry it."""
    return XML_FORBIDDEN.sub("", _ANSI_ESCAPE.sub("", text))


@dataclass
class CheckResult:
    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    group: str = "image"
    # What a check read back that the run keeps beside the reports (an environment's export).
    data: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.detail = printable_detail(str(self.detail))


@dataclass
class CheckContext:
    target: Target
    loaded: LoadedProfile
    # A VM booted for this run: checks may change it (authorise root, open a probe port).
    throwaway_vm: bool
    locks: list[dict] = field(default_factory=list)
    # A port no profile opens, forwarded to a throwaway VM to prove the firewall drops it.
    unlisted_port: int | None = None
    extra: dict = field(default_factory=dict)


def result(name: str, ok: bool, detail: str, group: str) -> CheckResult:
    """A passed or failed result, by `ok`."""
    return CheckResult(name, PASSED if ok else FAILED, detail, group=group)


def quote(text: str) -> str:
    """`text` as one word of a POSIX shell command line."""
    return shell_word(text)


def jupyter_token(ctx: CheckContext) -> str:
    """The Jupyter token the image made on its first boot ('' when there is none)."""
    return ctx.target.run(
        f"sudo sed -n 's/^JUPYTER_TOKEN=//p' {JUPYTER_TOKEN_FILE} 2>/dev/null"
    ).stdout.strip()


def unit_user(ctx: CheckContext, unit: str) -> str:
    """The user that a systemd service's main process runs as ('' when it is not running)."""
    return ctx.target.run(
        f"ps -o user= -p $(systemctl show -p MainPID --value {unit}.service)"
    ).stdout.strip()
