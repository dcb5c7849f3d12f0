"""The validation boot gives up at once on a kernel panic, instead of at its deadline."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from factory.errors import FactoryError
from factory.validate.boot import wait_for_host_keys

PANIC = (
    "[    0.004000] ..MP-BIOS bug: 8254 timer not connected to IO-APIC\n"
    "[    0.004000] Kernel panic - not syncing: IO-APIC + timer doesn't work!  Boot with "
    "apic=debug and send a report.  Then try booting with the 'noapic' option.\n"
)


def test_a_panicked_boot_fails_at_once_with_the_panic_line(tmp_path: Path):
    console, stderr = tmp_path / "console.log", tmp_path / "stderr"
    console.write_text(PANIC)
    stderr.write_text("")
    running = subprocess.Popen(["sleep", "60"])  # QEMU stays up after a guest panic
    try:
        started = time.monotonic()
        panicked = r"kernel panicked while booting: .*IO-APIC"
        with pytest.raises(FactoryError, match=panicked) as error:
            wait_for_host_keys(running, console, stderr, time.monotonic() + 600)
        assert time.monotonic() - started < 10
        kept = Path(str(error.value).rsplit("whole console: ", 1)[1].rstrip(")"))
        assert kept.read_text() == PANIC
        shutil.rmtree(kept.parent)
    finally:
        running.kill()
        running.wait()


def test_a_console_still_booting_is_waited_for(tmp_path: Path):
    console, stderr = tmp_path / "console.log", tmp_path / "stderr"
    console.write_text("[    1.000000] Run /init as init process\n")
    stderr.write_text("")
    running = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(FactoryError, match="did not print its SSH host keys") as error:
            wait_for_host_keys(running, console, stderr, time.monotonic() + 3)
        shutil.rmtree(Path(str(error.value).rsplit("whole console: ", 1)[1].rstrip(")")).parent)
    finally:
        running.kill()
        running.wait()
