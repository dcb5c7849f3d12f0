"""Child processes never outlive factory: real parents, real children, real signals.

packer is replaced by a script on PATH that sleeps (and starts a "QEMU" of its own): what is
under test is how factory starts, stops and cleans up after it, not packer's build."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from factory.build import run_packer
from factory.errors import FactoryError
from factory.progress import Progress
from tests.conftest import DEMO_PROFILE, FACTORY, REPO

FAKE_PACKER = """#!/usr/bin/env bash
# A packer that never finishes: `packer version` answers, anything else records its pid and
# the pid of a child of its own (as packer's QEMU), then sleeps.
if [ "$1" = version ]; then echo "Packer v1.6.6"; exit 0; fi
sleep 600 &
echo $! > "$FAKE_PACKER_PIDS/qemu"
echo "1700000000,qemu,ui,say,==> qemu: Waiting for SSH to become available..."
echo $$ > "$FAKE_PACKER_PIDS/packer"
exec sleep 600
"""


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def read_pid(path: Path) -> int:
    assert wait_until(lambda: path.is_file() and path.read_text().strip()), f"no {path}"
    return int(path.read_text())


def kill_leftovers(*pids: int) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fake_packer(tmp_path, monkeypatch) -> Path:
    """PATH with the sleeping packer first; returns the folder its pids are written to."""
    bin_dir, pids = tmp_path / "bin", tmp_path / "pids"
    bin_dir.mkdir()
    pids.mkdir()
    packer = bin_dir / "packer"
    packer.write_text(FAKE_PACKER)
    packer.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PACKER_PIDS", str(pids))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return pids


def start_python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *kwargs.pop("args", [])],
        cwd=REPO,
        **kwargs,
    )


def test_a_child_started_with_die_with_parent_dies_when_its_parent_is_killed(tmp_path):
    """SIGKILL leaves no handler to run: only the parent-death signal stops the child. The
    same child started without it survives its parent, which is what M4 found."""
    parent = start_python(
        """
        import subprocess, sys, time
        from factory.processes import die_with_parent
        for name, preexec in (("guarded", die_with_parent), ("unguarded", None)):
            child = subprocess.Popen(["sleep", "600"], preexec_fn=preexec, start_new_session=True)
            with open(f"{sys.argv[1]}/{name}", "w") as handle:
                handle.write(str(child.pid))
        time.sleep(600)
        """,
        args=[str(tmp_path)],
    )
    guarded, unguarded = read_pid(tmp_path / "guarded"), read_pid(tmp_path / "unguarded")
    try:
        assert alive(guarded) and alive(unguarded)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not alive(guarded)), "the guarded child outlived its parent"
        assert alive(unguarded)
    finally:
        kill_leftovers(guarded, unguarded)


RUN_PACKER = """
    import sys
    from pathlib import Path
    from factory.build import run_packer
    from factory.keys import ephemeral_keypair
    from factory.processes import Terminated, signals_as_exceptions
    from factory.progress import Progress

    build = Path(sys.argv[1])
    try:
        with signals_as_exceptions(), ephemeral_keypair("test") as key, Progress() as progress:
            (build / "key-path").write_text(str(key.private_key_file))
            run_packer(build, key.private_key_file, build / "build.log", progress)
    except Terminated:
        sys.exit(130)
"""


def test_packer_dies_when_factory_is_killed(tmp_path, fake_packer):
    """SIGKILL of the factory process while packer runs: packer gets SIGTERM (and the real
    packer stops its QEMU on it)."""
    build = tmp_path / "build"
    build.mkdir()
    parent = start_python(RUN_PACKER, args=[str(build)], stderr=subprocess.DEVNULL)
    packer, qemu = read_pid(fake_packer / "packer"), read_pid(fake_packer / "qemu")
    try:
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not alive(packer)), "packer outlived a killed factory"
    finally:
        kill_leftovers(packer, qemu)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM])
def test_stop_signals_stop_packer_and_everything_it_started(tmp_path, fake_packer, sig):
    """A hang-up (closed terminal, dropped SSH session), Ctrl-\\ or kill: factory stops
    packer's whole process group, removes the build key and exits 130."""
    build = tmp_path / "build"
    build.mkdir()
    parent = start_python(RUN_PACKER, args=[str(build)], stderr=subprocess.PIPE, text=True)
    packer, qemu = read_pid(fake_packer / "packer"), read_pid(fake_packer / "qemu")
    try:
        parent.send_signal(sig)
        _, stderr = parent.communicate(timeout=120)
        assert parent.returncode == 130, stderr
        # Under a loaded host (the suite runs in two workers) the group may take a moment.
        assert wait_until(lambda: not alive(packer) and not alive(qemu), timeout=30)
        key = Path((build / "key-path").read_text())
        assert not key.parent.exists()
        assert list((tmp_path / "tmp").iterdir()) == []
    finally:
        kill_leftovers(packer, qemu)


# The signal lands the moment packer has started, before run_packer holds its process: the
# Popen returns only once the fake packer has written both pids, then factory signals itself.
SIGNAL_WHILE_PACKER_STARTS = (
    """
    import os, signal, subprocess, sys, time
    from pathlib import Path

    class SignalledOnStart(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pids = Path(os.environ["FAKE_PACKER_PIDS"])
            while not (pids / "packer").is_file():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here, inside the start

    subprocess.Popen = SignalledOnStart
"""
    + RUN_PACKER
)


def test_a_stop_signal_while_packer_starts_still_stops_everything_it_started(tmp_path, fake_packer):
    """The window between starting packer and watching it: a kill there stops packer's whole
    process group too, instead of leaving its QEMU behind."""
    build = tmp_path / "build"
    build.mkdir()
    parent = start_python(
        SIGNAL_WHILE_PACKER_STARTS, args=[str(build)], stderr=subprocess.PIPE, text=True
    )
    packer, qemu = read_pid(fake_packer / "packer"), read_pid(fake_packer / "qemu")
    try:
        _, stderr = parent.communicate(timeout=120)
        assert parent.returncode == 130, stderr
        assert wait_until(lambda: not alive(packer) and not alive(qemu), timeout=30), (
            f"left running: packer {alive(packer)}, its QEMU {alive(qemu)}"
        )
    finally:
        kill_leftovers(packer, qemu)


def test_run_packer_stops_at_its_time_limit(tmp_path, fake_packer):
    """A build VM that hangs while QEMU lives on: past the limit packer's process group is
    stopped and the build fails with one line that says so."""
    key = tmp_path / "id_ed25519"
    key.write_text("unused")
    started = time.monotonic()
    with pytest.raises(FactoryError) as error, Progress() as progress:
        run_packer(tmp_path, key, tmp_path / "build.log", progress, time_limit_minutes=0.05)
    assert time.monotonic() - started < 60
    message = str(error.value)
    assert message.startswith("packer build ran past its time limit of 0.05 min and was stopped")
    assert "raise --time-limit" in message and "\n" not in message
    packer, qemu = read_pid(fake_packer / "packer"), read_pid(fake_packer / "qemu")
    assert wait_until(lambda: not alive(packer) and not alive(qemu), timeout=30)


def test_hangup_of_factory_render_on_a_closed_terminal_leaves_nothing(tmp_path, fake_packer):
    """The terminal of a running `factory render` goes away (its writes now fail with EIO),
    then SIGHUP arrives: the CLI stops its child, removes its scratch folder and the
    ephemeral key, releases the build lock and exits 130."""
    outputs = tmp_path / "outputs"
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*FACTORY, "render", str(DEMO_PROFILE), "--outputs", str(outputs)],
        cwd=REPO,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    packer = read_pid(fake_packer / "packer")
    try:
        assert list((tmp_path / "tmp").glob("factory-key-*"))
        os.close(controller)  # the terminal hangs up
        process.send_signal(signal.SIGHUP)
        assert process.wait(timeout=120) == 130
        assert wait_until(lambda: not alive(packer), timeout=30)
        assert list((tmp_path / "tmp").iterdir()) == []
        left = [p.name for p in outputs.rglob("*") if p.name.startswith((".render", ".staging"))]
        assert left == []
        assert not (outputs / "renders" / "demo_hello_v1").exists()
        with open(outputs / ".demo_hello_v1.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        kill_leftovers(packer, read_pid(fake_packer / "qemu"))
