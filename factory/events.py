"""Machine-readable runs (`factory build --events json`): one JSON object per line as each
stage starts and ends, for a scheduler or CI to read (docs/scheduling.md).

Every event has `event` and `time` (UTC, ISO 8601); all but `batch-end` name the `profile`
(the delivery name, or the profile's path before it loads). Kinds:
- `stage-start`: `stage`, and `cache` (hit or miss) for a layer;
- `stage-end`: `stage`, `seconds`, `status` (ok, failed or interrupted), `cache` for a layer,
  and `error` when it failed;
- `build-end`: `status`, `exit_code` (docs/exit-codes.md), `seconds`, and `delivery` or
  `error`;
- `batch-end` (several profiles with --jobs): `exit_code` and each profile's `results`.

Events go to standard output, and the build's own lines to standard error. A child build of
`--jobs` writes them to the file its parent names in $FACTORY_EVENTS_FILE; the parent relays
them, whole lines only, in the order they arrive.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

EVENTS_FILE_VAR = "FACTORY_EVENTS_FILE"
_sink: IO[str] | None = None


def start() -> None:
    """Turn events on: to standard output, or to $FACTORY_EVENTS_FILE where a parent set it."""
    global _sink
    path = os.environ.get(EVENTS_FILE_VAR)
    if path:
        _sink = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
    else:
        _sink = sys.stdout


def enabled() -> bool:
    return _sink is not None


def emit(event: str, profile: str | None, **fields: object) -> None:
    """Write one event line (nothing while events are off). None fields are left out."""
    if _sink is None:
        return
    record = {"event": event, "time": datetime.now(UTC).isoformat(timespec="seconds")}
    record.update({"profile": profile, **fields})
    record = {key: value for key, value in record.items() if value is not None}
    _sink.write(json.dumps(record) + "\n")
    _sink.flush()


class Relay:
    """Copies the complete lines children append to their events files to standard output."""

    def __init__(self) -> None:
        self.read: dict[Path, int] = {}

    def watch(self, path: Path) -> None:
        path.write_text("")
        self.read[path] = 0

    def pump(self) -> None:
        for path, offset in self.read.items():
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except OSError:
                continue
            complete = chunk[: chunk.rfind(b"\n") + 1]
            if complete:
                sys.stdout.write(complete.decode("utf-8", "replace"))
                sys.stdout.flush()
                self.read[path] = offset + len(complete)
