"""Locking against the real local channel with rattler, and pip's resolver for the target."""

import json
import time
from pathlib import Path

import pytest

from factory.profile import load_profile
from factory.resolve import ConflictError, lock_dir_for, lock_profile, solve_pip
from tests.conftest import DEMO_PROFILE, run_factory

KEY = DEMO_PROFILE.read_text().split("- ssh-ed25519 ", 1)[1].split("\n", 1)[0]


def profile_with(
    tmp_path: Path, channel: Path, conda: str, pip: str = "[]", python: str = "3.11"
) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"""\
client: acme
project: locks
version: 1
admin: {{user: analyst, ssh_keys: ["ssh-ed25519 {KEY}"]}}
jupyter: {{enabled: false}}
environments:
  - name: model
    python: "{python}"
    channels: ["{channel.as_uri()}"]
    conda: {conda}
    pip: {pip}
""")
    return path


def test_lock_writes_explicit_and_pip_locks(tmp_path, test_channel):
    loaded = load_profile(profile_with(tmp_path, test_channel, "[six]", "[tabulate]"))
    locks = lock_profile(loaded, log=lambda _: None)
    lock = locks["model"]
    assert {p.name for p in lock.conda} >= {"python", "six", "pip"}
    assert [p.name for p in lock.pip] == ["tabulate"]
    folder = lock_dir_for(loaded)
    explicit = (folder / "model.explicit.txt").read_text()
    assert "@EXPLICIT" in explicit and "/python-3.11.2-" in explicit
    assert "--hash=sha256:" in (folder / "model.pip.txt").read_text()


def test_second_lock_is_identical_and_does_not_solve(tmp_path, test_channel):
    loaded = load_profile(profile_with(tmp_path, test_channel, "[six]"))
    lock_profile(loaded, log=lambda _: None)
    folder = lock_dir_for(loaded)
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    time.sleep(0.01)
    lock_profile(loaded, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    lock_profile(loaded, force=True, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first


@pytest.mark.parametrize(
    "conda,python,expected",
    [
        ("[wants-pinned-lib-1, wants-pinned-lib-2]", "3.11", "pinned-lib"),
        ("[needs-newer-python]", "3.11", "needs-newer-python"),
        ("[no-such-package]", "3.11", "no-such-package"),
    ],
)
def test_conflicts_stop_in_seconds_and_name_packages(
    tmp_path, test_channel, conda, python, expected
):
    path = profile_with(tmp_path, test_channel, conda, python=python)
    started = time.monotonic()
    result = run_factory("lock", str(path))
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    first_line = errors[0]
    assert first_line.startswith("error: environment 'model'")
    assert expected in first_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p.lock" / "model.explicit.txt").exists()


def test_pip_package_without_wheel_for_target_python():
    # numpy 1.21.0 shipped no wheels for python 3.11.
    with pytest.raises(ConflictError) as error:
        solve_pip("model", "3.11", ["numpy==1.21.0"])
    assert "numpy==1.21.0" in str(error.value)
    assert "python 3.11" in str(error.value)


def test_lock_json_round_trips(tmp_path, test_channel):
    loaded = load_profile(profile_with(tmp_path, test_channel, "[six]"))
    lock = lock_profile(loaded, log=lambda _: None)["model"]
    data = json.loads((lock_dir_for(loaded) / "model.lock.json").read_text())
    assert data["inputs"] == lock.inputs_hash
