"""The local test channel solves and installs a working CPython env with rattler, offline."""

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
import rattler
from rattler import Channel
from rattler.exceptions import SolverError

from tests.channel import WHEELS, build_test_channel

PLATFORMS = ["linux-64", "noarch"]


@pytest.fixture(scope="module")
def channel() -> Path:
    return build_test_channel()


def solve(channel: Path, specs: list[str]) -> list[rattler.RepoDataRecord]:
    return asyncio.run(rattler.solve([Channel(channel.as_uri())], specs, platforms=PLATFORMS))


def run_env_python(prefix: Path, *args: str) -> str:
    # A clean environment: nothing from this venv or the host python may leak in.
    env = {"PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run(
        [str(prefix / "bin" / "python"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_channel_layout(channel: Path) -> None:
    for subdir in PLATFORMS:
        repodata = json.loads((channel / subdir / "repodata.json").read_text())
        packages = repodata.get("packages.conda", {})
        assert packages, f"{subdir} has no packages"
        for filename in packages:
            mode = (channel / subdir / filename).stat().st_mode & 0o777
            assert mode == 0o644, f"{subdir}/{filename} has mode {oct(mode)}"
    noarch = json.loads((channel / "noarch" / "repodata.json").read_text())["packages.conda"]
    names = {record["name"] for record in noarch.values()}
    assert set(WHEELS) <= names
    assert {"needs-newer-python", "pinned-lib", "wants-pinned-lib-1"} <= names


def test_python_env_installs_and_works(channel: Path, tmp_path: Path) -> None:
    records = solve(channel, ["python=3.11", "pip", "six", "tabulate"])
    versions = {record.name.normalized: str(record.version) for record in records}
    assert versions["python"] == "3.11.2"
    assert versions["pip"] == WHEELS["pip"][0]

    # Installed under a prefix unlike the build's placeholder, as /opt/conda/envs/demo would be.
    prefix = tmp_path / "conda" / "envs" / "demo"
    asyncio.run(
        rattler.install(
            records, target_prefix=prefix, cache_dir=tmp_path / "pkgs", show_progress=False
        )
    )

    out = run_env_python(
        prefix,
        "-c",
        "import sys, ssl, sqlite3, ctypes, zlib, bz2, lzma, readline, uuid, six, tabulate\n"
        "ctypes.CDLL(None)\n"
        "sqlite3.connect(':memory:').execute('select 1')\n"
        "print(sys.prefix)\n"
        "print(sys.version_info[:3])\n"
        "print(tabulate.tabulate([[1, 2]]))",
    )
    lines = out.splitlines()
    assert lines[0] == str(prefix)
    assert lines[1] == "(3, 11, 2)"
    pip_version = run_env_python(prefix, "-m", "pip", "--version")
    assert pip_version.startswith(f"pip {WHEELS['pip'][0]} from {prefix}/lib/python3.11/")


def test_conflicting_pins_do_not_solve(channel: Path) -> None:
    # Each one alone solves...
    for spec in ("wants-pinned-lib-1", "wants-pinned-lib-2"):
        assert any(r.name.normalized == "pinned-lib" for r in solve(channel, [spec]))
    # ...together they cannot.
    with pytest.raises(SolverError, match="pinned-lib"):
        solve(channel, ["wants-pinned-lib-1", "wants-pinned-lib-2"])


def test_package_needing_newer_python_does_not_solve(channel: Path) -> None:
    with pytest.raises(SolverError):
        solve(channel, ["python=3.11", "needs-newer-python"])
