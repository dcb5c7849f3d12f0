"""Progress for long steps: a live line on a terminal, plain timestamped lines elsewhere."""

from __future__ import annotations

import sys
import time

from rich.console import Console


class Progress:
    """Shows `[stage] step · elapsed` and prints one line each time the step changes."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        # In a log file (a scheduler's, CI's) a line stays whole, for grep.
        self.soft_wrap = not self.console.is_terminal
        self.started = time.monotonic()
        self.stage = ""
        self.step = ""
        self._status = None

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"

    def __enter__(self) -> Progress:
        if self.console.is_terminal:
            self._status = self.console.status("")
            self._status.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._status is not None:
            self._status.__exit__(*exc_info)
            self._status = None

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self.step = ""
        self.console.print(f"[{self.elapsed()}] {stage}", markup=False, soft_wrap=self.soft_wrap)
        self.refresh()

    def update(self, step: str) -> None:
        """Record a new step; repeated identical steps only refresh the elapsed time."""
        if step != self.step:
            self.step = step
            self.console.print(
                f"[{self.elapsed()}]   {step}", markup=False, soft_wrap=self.soft_wrap
            )
        self.refresh()

    def refresh(self) -> None:
        if self._status is not None:
            self._status.update(f"{self.stage} › {self.step} · {self.elapsed()}")

    def log(self, message: str) -> None:
        self.update(message)


def plain_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
