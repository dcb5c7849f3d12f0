"""A real local conda channel for the tests and the demo, built here without any conda channel.

What it holds:

* ``linux-64/python-3.11.2`` and ``linux-64/python-3.13.5`` -- CPython built by rattler-build
  from Debian's pool copies of the upstream source (``recipes/python``,
  ``recipes/python-3.13``), against Debian 12's runtime libraries; ``python_abi`` 3.11 (cp311)
  and 3.13 (cp313) for their run_exports.
* ``noarch/`` pure-Python packages converted from pinned PyPI wheels by whl2conda
  (``WHEELS``: pip, setuptools, wheel + its dependency packaging, six, tabulate).
* ``noarch/`` conflict fixtures: ``needs-newer-python`` (python >=3.13), ``pinned-lib`` 1.0 and
  2.0, ``wants-pinned-lib-1`` (pinned-lib 1.*) and ``wants-pinned-lib-2`` (pinned-lib 2.*).

The channel is cached at ``cache_dir()/channels/test-<key>``, keyed by the recipes' contents,
the pinned wheels and ``CHANNEL_FORMAT``. A new channel takes every package it can from the
channels already built here (a recipe's package when it embeds that recipe's files unchanged, a
converted wheel of the same pinned version) and builds only the rest: their bytes, and so the
md5s that every cached environment layer is keyed by, stay as they were. Building needs the apt
packages in ``apt-packages.txt``, Debian's mirror (the CPython source) and PyPI (the wheels);
using a cached channel needs nothing. Test code only: nothing in ``factory/`` may import this.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from conda_package_streaming.package_streaming import stream_conda_info

from factory.cache import cache_dir, inputs_key

HERE = Path(__file__).resolve().parent
RECIPES_DIR = HERE / "recipes"
APT_PACKAGES_FILE = HERE / "apt-packages.txt"

#: Bump to rebuild every cached channel after a change to how this module builds them.
CHANNEL_FORMAT = 1

#: PyPI wheels converted to ``noarch: python`` conda packages: name -> (version, wheel sha256).
#: Every dependency of these wheels is itself in this list (wheel needs packaging).
WHEELS: dict[str, tuple[str, str]] = {
    "pip": ("26.3", "f3b60b20ffaadd4415ed7957212a38ac63fa4c5fa375bd0f4a797777940fad13"),
    "setuptools": (
        "84.2.1",
        "ca140b45d5325a9478f880e351484f62fef15f336462e449ca0c03c873d589c2",
    ),
    "wheel": ("0.48.0", "3217dcc807155e45db462d7ef2431f5ddda0d7273b700d05a67b271ceb1287ab"),
    "packaging": ("26.4", "81383611a09c1bc0b08b76e0fd5829d7c6824c65b27a6aee339da133f4233ea2"),
    "six": ("1.17.0", "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274"),
    "tabulate": ("0.10.0", "f0b0622e567335c8fabaaa659f1b33bcb6ddfe2e496071b743aa113f8774f2d3"),
}

SUBDIRS = ("linux-64", "noarch")


#: Where a channel records the CHANNEL_FORMAT it was built with; a channel without it is format 1.
FORMAT_FILE = "channel-format.json"


def recipe_files() -> list[Path]:
    """Every recipe.yaml under recipes/, in a stable order (the CPythons, the slow ones, first)."""
    files = sorted(RECIPES_DIR.glob("*/recipe.yaml"))
    return sorted(files, key=lambda path: not compiles_cpython(path.parent.name))


def compiles_cpython(recipe_name: str) -> bool:
    return recipe_name == "python" or recipe_name.startswith("python-")


def channel_key() -> str:
    """The cache key: recipe contents, pinned wheels and the build format."""
    recipes = {
        str(path.relative_to(RECIPES_DIR)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in RECIPES_DIR.rglob("*")
        if path.is_file()
    }
    wheels = {name: list(pin) for name, pin in WHEELS.items()}
    return inputs_key({"format": CHANNEL_FORMAT, "recipes": recipes, "wheels": wheels})


def channel_path() -> Path:
    """Where the channel for the current inputs lives (it may not be built yet)."""
    return cache_dir() / "channels" / f"test-{channel_key()}"


def is_complete(channel: Path) -> bool:
    return all((channel / subdir / "repodata.json").is_file() for subdir in SUBDIRS)


def build_test_channel(log: Callable[[str], None] = print) -> Path:
    """Return the path of the cached test channel, building it if absent."""
    key = channel_key()
    root = cache_dir() / "channels"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"test-{key}"
    if is_complete(final):
        return final
    with _locked(root / f".test-{key}.lock"):
        if is_complete(final):  # another process built it while we waited
            return final
        for stale in root.glob(f".test-{key}-*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        log_path = root / f"test-{key}.log"
        started = time.monotonic()
        log(f"building the test channel test-{key} (full log: {log_path})")
        work = Path(tempfile.mkdtemp(prefix=f".test-{key}-", dir=root))
        try:
            reusable = reusable_packages(root)
            with open(log_path, "w", encoding="utf-8") as log_file:
                _Builder(work, log, log_file, reusable).build()
            if final.exists():  # an incomplete leftover from something else
                shutil.rmtree(final)
            os.replace(work / "channel", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"test channel ready in {time.monotonic() - started:.0f} s: {final}")
        return final


class BuiltPackage:
    """A package file of an already built channel, and what it was made from."""

    def __init__(self, path: Path):
        self.path = path
        self.subdir = path.parent.name
        self.recipe_files: dict[str, bytes] = {}  # info/recipe/<path> -> bytes (rattler-build)
        self.index: dict = {}
        for tar, member in stream_conda_info(path):
            if not member.isfile():
                continue
            if member.name == "info/index.json":
                self.index = json.loads(tar.extractfile(member).read())
            elif member.name.startswith("info/recipe/"):
                relative = member.name.removeprefix("info/recipe/")
                self.recipe_files[relative] = tar.extractfile(member).read()

    def built_from(self, recipe_dir: Path) -> bool:
        """Whether rattler-build made this package from recipe_dir's files as they are now."""
        files = [path for path in recipe_dir.rglob("*") if path.is_file()]
        return bool(files) and all(
            self.recipe_files.get(str(path.relative_to(recipe_dir))) == path.read_bytes()
            for path in files
        )

    def converted_wheel(self, name: str, version: str) -> bool:
        """Whether this is whl2conda's package of that pinned wheel (PyPI never replaces a
        release's files, so the version names the wheel)."""
        return (
            not self.recipe_files
            and self.index.get("name") == name
            and self.index.get("version") == version
            and self.index.get("noarch") == "python"
        )


def channel_format(channel: Path) -> int:
    record = channel / FORMAT_FILE
    return json.loads(record.read_text())["format"] if record.is_file() else 1


def reusable_packages(root: Path) -> list[BuiltPackage]:
    """The packages of every complete channel under root built with this CHANNEL_FORMAT,
    newest channel first, one per file name."""
    channels = [
        path
        for path in root.glob("test-*")
        if path.is_dir() and is_complete(path) and channel_format(path) == CHANNEL_FORMAT
    ]
    channels.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    packages: dict[str, BuiltPackage] = {}
    for channel in channels:
        for path in sorted(channel.glob("*/*.conda")):
            key = f"{path.parent.name}/{path.name}"
            if key not in packages:
                packages[key] = BuiltPackage(path)
    return list(packages.values())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Builder:
    """One build of the channel inside the scratch directory ``work``."""

    def __init__(
        self,
        work: Path,
        log: Callable[[str], None],
        log_file: IO[str],
        reusable: list[BuiltPackage],
    ):
        self.work = work
        self.reusable = reusable
        self.channel = work / "channel"
        self.rattler_out = work / "rattler-build"
        self.wheels = work / "wheels"
        self._log = log
        self._log_file = log_file
        self._started = time.monotonic()

    def say(self, message: str) -> None:
        """A progress line: to the caller's log and the full log."""
        self._log(message)
        self.detail(message)

    def detail(self, message: str) -> None:
        """A line for the full log only, stamped with the seconds since the build started."""
        stamp = f"[{time.monotonic() - self._started:7.1f}s] "
        self._log_file.write(stamp + message.rstrip("\n") + "\n")
        self._log_file.flush()

    def build(self) -> None:
        for subdir in SUBDIRS:
            (self.channel / subdir).mkdir(parents=True)
        self.build_recipes()
        self.convert_wheels()
        for package in self.channel.glob("*/*.conda"):
            package.chmod(0o644)  # rattler-build writes 0600
        self.say("indexing the channel")
        asyncio.run(self.index())
        (self.channel / FORMAT_FILE).write_text(json.dumps({"format": CHANNEL_FORMAT}) + "\n")

    def reuse(self, packages: list[BuiltPackage]) -> None:
        """Copy already built packages in, byte for byte."""
        for package in packages:
            target = self.channel / package.subdir / package.path.name
            shutil.copyfile(package.path, target)
            origin = package.path.parent.parent.name
            self.say(f"  reused {target.relative_to(self.channel)} from {origin}")

    def build_recipes(self) -> None:
        from rattler_build import Stage0Recipe, ToolConfiguration

        for recipe_file in recipe_files():
            name = recipe_file.parent.name
            built = [p for p in self.reusable if p.built_from(recipe_file.parent)]
            if built:
                self.reuse(built)
                continue
            slow = " (compiles CPython: minutes)" if compiles_cpython(name) else ""
            self.say(f"rattler-build: {name}{slow}")
            started = time.monotonic()
            recipe = Stage0Recipe.from_file(recipe_file)
            try:
                results = recipe.run_build(
                    tool_config=ToolConfiguration(test_strategy="skip"),
                    output_dir=self.rattler_out,
                    channels=[],  # no remote channel: the recipes need none
                    progress_callback=_LogCallback(self.detail),
                )
            except Exception as error:
                script_log = self._script_logs()
                self.detail(f"rattler-build failed for {name}: {error}\n{script_log}")
                raise RuntimeError(
                    f"rattler-build failed for recipe {name}: {error}\n"
                    f"(full log: {self._log_file.name})"
                ) from error
            for result in results:  # (result.log repeats what the callback already wrote)
                for package in result.packages:
                    target = self.channel / result.platform / Path(package).name
                    shutil.copyfile(package, target)
                    self.say(f"  built {target.relative_to(self.channel)}")
            self.detail(f"  ({time.monotonic() - started:.1f} s)")

    def _script_logs(self) -> str:
        """The build scripts' own output, which rattler-build keeps in the work dir."""
        parts = []
        for script_log in sorted(self.rattler_out.glob("bld/*/work/conda_build.log")):
            parts.append(f"--- {script_log}\n{script_log.read_text(errors='replace')}")
        return "\n".join(parts)

    def convert_wheels(self) -> None:
        self.wheels.mkdir()
        missing = {}
        for name, (version, sha256) in WHEELS.items():
            converted = [p for p in self.reusable if p.converted_wheel(name, version)]
            if converted:
                self.reuse(converted[:1])
            else:
                missing[name] = (version, sha256)
        if missing:
            self.download_and_convert(missing)
        converted = sorted(path.name for path in (self.channel / "noarch").glob("*-py_*.conda"))
        self.say(f"  noarch wheels: {', '.join(converted)}")
        if len(converted) != len(WHEELS):
            raise RuntimeError(f"expected {len(WHEELS)} converted wheels, got {converted}")

    def download_and_convert(self, wheels: dict[str, tuple[str, str]]) -> None:
        requirements = self.work / "wheels.txt"
        requirements.write_text(
            "".join(
                f"{name}=={version} --hash=sha256:{sha256}\n"
                for name, (version, sha256) in wheels.items()
            )
        )
        self.say(f"downloading {len(wheels)} wheels from PyPI")
        self._run(
            [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
             "--no-deps", "--only-binary=:all:", "--require-hashes",
             "-r", str(requirements), "-d", str(self.wheels)]
        )  # fmt: skip
        for wheel in sorted(self.wheels.glob("*.whl")):
            self._run(
                [sys.executable, "-m", "whl2conda", "convert", str(wheel),
                 "--out-dir", str(self.channel / "noarch"), "--format", "V2",
                 "--batch", "--yes", "--overwrite"]
            )  # fmt: skip

    def _run(self, command: list[str]) -> None:
        self.detail("$ " + " ".join(command))
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.detail(proc.stdout)
        if proc.returncode:
            raise RuntimeError(
                f"{command[2]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                f"\n(full log: {self._log_file.name})"
            )

    async def index(self) -> None:
        from rattler.index import index_fs

        # Plain repodata.json only: the most widely readable form of a channel.
        await index_fs(self.channel, force=True, write_zst=False, write_shards=False)
        for subdir in SUBDIRS:
            if not (self.channel / subdir / "repodata.json").is_file():
                raise RuntimeError(f"indexing wrote no {subdir}/repodata.json")


class _LogCallback:
    """Sends rattler-build's log events to the full log."""

    def __init__(self, write: Callable[[str], None]):
        self.write = write

    def on_download_start(self, event) -> None:
        self.write(f"download {event.url}")

    def on_download_progress(self, event) -> None:
        pass

    def on_download_complete(self, event) -> None:
        pass

    def on_build_step(self, event) -> None:
        self.write(f"[{event.step_name}] {event.message}")

    def on_log(self, event) -> None:
        self.write(f"{event.level}: {event.message}")
