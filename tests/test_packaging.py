"""factory installed as a normal package: a wheel in a fresh venv, away from the checkout,
renders every example profile, and one render passes `packer validate`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

PROFILES = sorted(p for p in (REPO / "profiles").glob("*.yaml"))


def test_every_package_of_factory_is_in_the_wheel_list():
    """pyproject lists the packages by hand (to map packer/ and provisioners/ into the
    wheel); a new sub-package left out of that list would be missing from the wheel."""
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "factory").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"


@pytest.fixture(scope="module")
def installed(tmp_path_factory, demo_channel) -> Path:
    """A venv outside the repository with factory installed from a freshly built wheel."""
    root = tmp_path_factory.mktemp("installed")
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(wheels), str(REPO)],
        check=True,
        cwd=root,
        capture_output=True,
    )
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' scratch folder
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (wheel,) = wheels.glob("factory-*.whl")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        check=True,
        cwd=root,
        capture_output=True,
        timeout=900,
    )
    return venv


def _factory(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv / "bin" / "factory"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_wheel_carries_the_image_sources_and_renders_every_profile(installed, tmp_path):
    package = next((installed / "lib").glob("python3*/site-packages/factory"))
    assert (package / "packer" / "image.pkr.hcl.j2").is_file()
    assert (package / "provisioners" / "10-system.sh").is_file()
    assert (package / "profile" / "presets" / "banking.yaml").is_file()
    for profile in PROFILES:
        into = tmp_path / profile.stem
        result = _factory(installed, "render", str(profile), "--into", str(into), cwd=tmp_path)
        assert result.returncode == 0, f"{profile.name}: {result.stderr}"
        assert (into / "image.pkr.hcl").is_file()
        assert any(into.rglob("10-system.sh"))
    # `factory render` runs `packer validate`; run it once more here, on the installed copy.
    demo = tmp_path / "demo"
    variables = next(demo.glob("image.pkrvars.*")).name
    key = tmp_path / "build-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    result = subprocess.run(
        ["packer", "validate", f"-var-file={variables}", "image.pkr.hcl"],
        cwd=demo,
        env={**os.environ, "PKR_VAR_build_ssh_key_file": str(key), "CHECKPOINT_DISABLE": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
