"""The validation boot gives up at once on a kernel panic, instead of at its deadline."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from factory.errors import FactoryError
from factory.validate.boot import host_keys_from_console, wait_for_host_keys

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


def test_a_key_the_console_cut_short_is_neither_pinned_nor_shown(tmp_path: Path):
    """A getty that starts while the keys are still being sent flushes part of a line (CI saw an
    RSA key lose its middle): only keys that arrived whole may come back."""
    keys = {}
    for kind in ("ecdsa", "ed25519", "rsa"):
        path = tmp_path / kind
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", path], check=True)
        keys[kind] = " ".join(path.with_suffix(".pub").read_text().split()[:2])
    rsa_type, rsa_blob = keys["rsa"].split()
    cut = f"{rsa_type} {rsa_blob[:120]}{rsa_blob[-200:]}"  # a whole number of base64 quads
    block = "\n".join(["-----BEGIN FACTORY SSH HOST KEYS-----", keys["ecdsa"], keys["ed25519"]])
    end = "-----END FACTORY SSH HOST KEYS-----\n"
    console = f"host login: {block}\n{cut} root@host\n{end}"
    assert host_keys_from_console(console) == [keys["ecdsa"], keys["ed25519"]]
    whole = f"host login: {block}\n{keys['rsa']} root@host\n{end}"
    assert host_keys_from_console(whole) == [keys["ecdsa"], keys["ed25519"], keys["rsa"]]
