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

from tests.channel import (
    RECIPES_DIR,
    WHEELS,
    _Builder,
    build_test_channel,
    reusable_packages,
)

PLATFORMS = ["linux-64", "noarch"]


@pytest.fixture(scope="module")
def channel() -> Path:
    return build_test_channel()


def solve(channel: Path, specs: list[str]) -> list[rattler.RepoDataRecord]:
    return asyncio.run(rattler.solve([Channel(channel.as_uri())], specs, platforms=PLATFORMS))


def install(records: list[rattler.RepoDataRecord], prefix: Path, tmp_path: Path) -> None:
    asyncio.run(
        rattler.install(
            records, target_prefix=prefix, cache_dir=tmp_path / "pkgs", show_progress=False
        )
    )


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
    install(records, prefix, tmp_path)

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


def test_python_313_env_works_and_takes_a_cp313_wheel(channel: Path, tmp_path: Path) -> None:
    records = solve(channel, ["python=3.13", "pip"])
    versions = {record.name.normalized: str(record.version) for record in records}
    assert versions["python"] == "3.13.5"
    prefix = tmp_path / "conda" / "envs" / "next"
    install(records, prefix, tmp_path)
    code = "import sys, ssl, sqlite3, ctypes, decimal\nprint(sys.prefix)\nprint(sys.version)"
    out = run_env_python(prefix, "-c", code)
    assert out.splitlines()[0] == str(prefix)
    assert out.splitlines()[1].startswith("3.13.5 ")
    # A binary wheel built for CPython 3.13 (its compiled module is cp313's) installs and loads.
    run_env_python(
        prefix, "-m", "pip", "install", "--only-binary=:all:", "--no-deps", "markupsafe==3.0.3"
    )
    speedups = run_env_python(prefix, "-c", "import markupsafe._speedups as m; print(m.__file__)")
    assert speedups.strip().endswith("_speedups.cpython-313-x86_64-linux-gnu.so")


def test_each_python_has_its_abi_package(channel: Path) -> None:
    """The package each python's run_exports names (python_abi X.Y.* *_cpXY) is there."""
    for python, abi in (("3.11", "cp311"), ("3.13", "cp313")):
        records = solve(channel, [f"python={python}", f"python_abi {python}.* *_{abi}"])
        (record,) = [r for r in records if r.name.normalized == "python_abi"]
        assert (str(record.version), str(record.build).split("_")[-1]) == (python, abi)


def test_a_new_channel_reuses_every_package_byte_for_byte(channel: Path, tmp_path: Path) -> None:
    """What build_test_channel does when a recipe is added: every package it can take from an
    existing channel (here: all of them) is copied, nothing is built or downloaded."""
    root = tmp_path / "channels"
    root.mkdir()
    (root / "test-existing").symlink_to(channel)
    reusable = reusable_packages(root)
    for recipe in sorted(RECIPES_DIR.iterdir()):  # each recipe's package embeds its recipe
        assert len([p for p in reusable if p.built_from(recipe)]) == 1, recipe.name
    lines: list[str] = []
    work = tmp_path / "work"
    work.mkdir()
    with open(tmp_path / "build.log", "w") as log_file:
        _Builder(work, lines.append, log_file, reusable).build()
    assert not [line for line in lines if line.startswith(("rattler-build", "downloading"))]
    built = sorted((work / "channel").glob("*/*.conda"))
    assert [p.relative_to(work / "channel") for p in built] == [
        p.relative_to(channel) for p in sorted(channel.glob("*/*.conda"))
    ]
    for package in built:
        original = channel / package.parent.name / package.name
        assert package.read_bytes() == original.read_bytes(), package.name
    # A recipe that changed is built again rather than reused.
    edited = tmp_path / "recipe"
    edited.mkdir()
    recipe = (RECIPES_DIR / "pinned-lib-1" / "recipe.yaml").read_text()
    (edited / "recipe.yaml").write_text(recipe.replace("1.0", "1.1"))
    assert not any(p.built_from(edited) for p in reusable)


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
