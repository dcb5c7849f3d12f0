"""The tool table, NoCloud seeds, the Jinja environment and the process helpers, on this
host's real tools and real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory import processes, seed, templates, tools
from factory.errors import ToolError


def test_require_finds_a_present_tool_and_names_the_package_of_a_missing_one(monkeypatch):
    assert os.path.isabs(tools.require("tar"))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(tools, "_SBIN_DIRS", ())
    with pytest.raises(ToolError) as error:
        tools.require("cloud-localds")
    assert str(error.value) == (
        "`cloud-localds` is missing; run `apt-get install -y cloud-image-utils`"
    )
    assert tools.missing(["tar", "qemu-img"]) == ["tar", "qemu-img"]


def test_every_tool_has_a_package_and_unknown_tools_are_refused():
    assert all(package and " " not in package for package in tools.TOOLS.values())
    with pytest.raises(KeyError, match="not in factory.tools.TOOLS"):
        tools.package_of("no-such-tool")
    assert tools.install_command(["mount", "losetup", "sfdisk"]) == (
        "apt-get install -y fdisk mount"
    )


@pytest.mark.skipif(tools.which("cloud-localds") is None, reason="needs cloud-localds")
def test_write_seed_iso_writes_an_iso_with_both_files(tmp_path):
    user_data = "#cloud-config\n" + str(seed.temporary_login("tester", "ssh-ed25519 AAAA t"))
    iso = seed.write_seed_iso(tmp_path, user_data, seed.meta_data("i-1", "box"))
    assert iso == tmp_path / "seed.iso"
    data = iso.read_bytes()
    assert b"CIDATA" in data.upper() and b"instance-id: i-1" in data
    assert (tmp_path / "meta-data").read_text() == "instance-id: i-1\nlocal-hostname: box\n"


def test_write_seed_iso_turns_a_failure_into_one_line(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "cloud-localds"
    fake.write_text("#!/bin/sh\necho 'genisoimage: first line' >&2\necho 'no space' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with pytest.raises(ToolError) as error:
        seed.write_seed_iso(tmp_path / "seed", "#cloud-config\n", seed.meta_data("i", "h"))
    assert str(error.value) == (
        f"cloud-localds could not write {tmp_path}/seed/seed.iso (exit 3): no space"
    )


def test_templates_escape_markup_only():
    env = templates.environment()
    assert env.autoescape("ovf.xml.j2") and env.autoescape("report.html.j2")
    assert not env.autoescape("image.pkr.hcl.j2")
    assert not env.autoescape("box-Vagrantfile.j2")
    text = templates.render_template(
        "image.pkr.hcl.j2",
        builder="qemu",
        payload_dir="/tmp/p",
        guest_network=False,
        modern_packer=True,
        uploads=["settings.sh"],
        scripts=["a<b.sh"],
    )
    assert 'script           = "a<b.sh"' in text and text.endswith("}\n")


def _running_in_group(pgid: int) -> list[int]:
    """Processes (zombies aside) whose process group is `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


SLEEPER = "import os, time; os.fork() or time.sleep(60); time.sleep(60)"


def test_stop_ends_the_whole_group_after_the_grace():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(15, signal.SIG_IGN); " + SLEEPER,
        ],
        start_new_session=True,
    )
    time.sleep(0.5)
    started = time.monotonic()
    processes.stop(child, grace=0.5)
    assert 0.4 <= time.monotonic() - started < 10
    assert child.returncode == -signal.SIGKILL
    assert _wait_for(lambda: not _running_in_group(child.pid))  # the forked child too


def test_stop_sends_the_first_signal_and_waits():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    processes.stop(child, group=False, first=signal.SIGINT, grace=10)
    assert child.returncode != -signal.SIGKILL


def test_signals_as_exceptions_raises_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(processes.Terminated) as stopped:
        with processes.signals_as_exceptions():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == before
