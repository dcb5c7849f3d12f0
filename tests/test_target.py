"""The validator's local target: output on both streams is read in full, and a timeout stops
the whole command, its children included."""

import os
import time

import paramiko
import pytest

from factory.validate.target import LocalTarget, ScriptedTarget, SSHTarget


def test_large_stderr_and_stdin_do_not_stall():
    result = LocalTarget().run("cat; head -c 300000 /dev/zero >&2", stdin="to stdout")
    assert (result.exit_code, result.stdout, len(result.stderr)) == (0, "to stdout", 300000)


def test_timeout_stops_the_children_too(tmp_path):
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    result = LocalTarget().run(f"sleep 300 & echo $! > {pid_file}; wait", timeout=2)
    assert result.exit_code == 124 and time.monotonic() - started < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"the command's child {child} outlived the timeout")


def test_a_scripted_target_answers_only_what_was_recorded():
    recorded = {"commands": {"hostname": {"stdout": "validate\n", "stderr": "", "exit_code": 0}}}
    target = ScriptedTarget(recorded)
    assert target.run("hostname").stdout == "validate\n"
    with pytest.raises(KeyError, match="uname -r"):
        target.run("uname -r")
    assert target.ran == ["hostname", "uname -r"]


def test_an_ssh_target_reaches_a_vm_port_through_its_forward():
    target = SSHTarget(paramiko.SSHClient(), "u", "u@vm", host="127.0.0.1", forwards={443: 40443})
    assert target.address(443) == ("127.0.0.1", 40443)
    live = SSHTarget(paramiko.SSHClient(), "u", "u@host", host="10.0.0.5")
    assert live.address(443) == ("10.0.0.5", 443)
