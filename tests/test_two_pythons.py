"""Two Pythons side by side, with no VM: the maintenance profile's environments (Python 3.11 and
3.13) are made from the test channel with rattler (offline) and their locked wheels (from the
factory's wheel cache, which a build of the profile fills too); each becomes a kernel of a
Jupyter environment as provisioners/40-jupyter-client.sh makes them (`ipykernel install
--prefix`), and each sample notebook runs with nbclient on the kernel the validator picks for it
(factory.profile.paths.notebook_kernel)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
import rattler
from rattler import Channel

from factory.profile import load_profile
from factory.profile.paths import notebook_kernel
from factory.resolve import fetch_wheel, lock_profile
from tests.conftest import REPO

PROFILE = REPO / "profiles" / "factory_predictive_maintenance_v1.yaml"
PLATFORMS = ["linux-64", "noarch"]
# What the runner uses; the image's jupyter environment has it too.
RUNNER_PACKAGES = ["nbclient", "nbformat", "jupyter_client"]
RUNNER = """
import sys, nbclient, nbformat
notebook = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(notebook, timeout=600, kernel_name=sys.argv[2]).execute()
nbformat.write(notebook, sys.argv[3])
"""


def make_env(channel: Path, specs: list[str], prefix: Path, cache: Path) -> None:
    records = asyncio.run(rattler.solve([Channel(channel.as_uri())], specs, platforms=PLATFORMS))
    asyncio.run(
        rattler.install(records, target_prefix=prefix, cache_dir=cache, show_progress=False)
    )


def run(prefix: Path, *args: str, home: Path, cwd: Path | None = None) -> str:
    """The env's python with a clean environment: nothing from this venv may leak in; in `cwd`
    (a notebook writes its figures beside itself), else $HOME."""
    env = {
        "PATH": f"{prefix / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "PIP_CACHE_DIR": str(Path.home() / ".cache" / "pip"),  # warm across runs
        **{k: v for k, v in os.environ.items() if k.startswith("PIP_") and k != "PIP_CACHE_DIR"},
    }
    proc = subprocess.run(
        [str(prefix / "bin" / "python"), *args],
        env=env,
        cwd=cwd or home,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def pip_install(prefix: Path, packages: list[str], home: Path) -> None:
    run(prefix, "-m", "pip", "install", "--only-binary=:all:", "--quiet", *packages, home=home)


def install_locked_wheels(prefix: Path, wheels: list[Path], home: Path) -> None:
    """The lock's wheels as they are: no index, no resolving (and no byte-compiling ahead)."""
    run(prefix, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet",
        *map(str, wheels), home=home)  # fmt: skip


@pytest.fixture(scope="module")
def jupyter(test_channel: Path, tmp_path_factory) -> dict:
    """A Jupyter environment whose kernels are the profile's environments:
    {"prefix": the jupyter env, "home": $HOME, "envs": {name: (prefix, python)}}."""
    root = tmp_path_factory.mktemp("two-pythons")
    home, cache = root / "home", root / "pkgs"
    home.mkdir()
    loaded = load_profile(PROFILE)
    profile = loaded.profile
    locks = lock_profile(loaded, log=lambda _: None)  # solves only when the lock is stale
    jupyter_prefix = root / "envs" / "jupyter"
    make_env(test_channel, ["python=3.11", "pip"], jupyter_prefix, cache)
    pip_install(jupyter_prefix, RUNNER_PACKAGES, home)
    envs = {}
    for env in profile.environments:
        prefix = root / "envs" / env.name
        make_env(test_channel, [*env.conda], prefix, cache)
        wheels = [fetch_wheel(package.url, package.sha256) for package in locks[env.name].pip]
        install_locked_wheels(prefix, wheels, home)  # ipykernel included: the image's too
        run(prefix, "-m", "ipykernel", "install", "--prefix", str(jupyter_prefix),
            "--name", env.name, "--display-name", f"Python ({env.name})", home=home)  # fmt: skip
        envs[env.name] = (prefix, env.python)
    return {"prefix": jupyter_prefix, "home": home, "envs": envs, "notebooks": profile.notebooks}


def test_the_profile_has_two_pythons_and_a_notebook_for_each():
    profile = load_profile(PROFILE).profile
    environments = [env.name for env in profile.environments]
    assert {env.python for env in profile.environments} == {"3.11", "3.13"}
    kernels = [notebook_kernel(Path(n), environments) for n in profile.notebooks]
    assert kernels == ["maintenance", "maintenance-next"]


def test_each_kernel_starts_its_own_environments_python(jupyter):
    kernels = jupyter["prefix"] / "share" / "jupyter" / "kernels"
    for name, (prefix, _) in jupyter["envs"].items():
        argv = json.loads((kernels / name / "kernel.json").read_text())["argv"]
        assert Path(argv[0]).parent == prefix / "bin", argv


def test_each_notebook_runs_on_its_own_kernel_and_python(jupyter, tmp_path):
    environments = list(jupyter["envs"])
    for notebook in map(Path, jupyter["notebooks"]):
        kernel = notebook_kernel(notebook, environments)
        prefix, python = jupyter["envs"][kernel]
        executed = tmp_path / notebook.name
        run(jupyter["prefix"], "-c", RUNNER, str(notebook), kernel, str(executed),
            home=jupyter["home"], cwd=tmp_path)  # fmt: skip
        ran = json.loads(executed.read_text())
        # The kernel's own report of its language (kernel_info), as nbclient records it.
        version = ran["metadata"]["language_info"]["version"]
        assert version.rsplit(".", 1)[0] == python, (notebook.name, kernel, version)
        outputs = "".join(
            "".join(output.get("text", ""))
            for cell in ran["cells"]
            for output in cell.get("outputs", [])
        )
        if kernel == "maintenance-next":  # it prints its own interpreter's version and prefix
            assert version in outputs and str(prefix) in outputs, outputs[:2000]
