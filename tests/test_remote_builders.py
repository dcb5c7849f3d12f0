"""`factory render --builder vsphere-clone|proxmox-clone`: the demo profile rendered for a
client's own cluster, checked by the real `packer validate` of Debian's packer 1.6.6 (which
has both builders), with the cluster's connection only in the environment."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from factory.render import REMOTE_BUILDERS
from tests.conftest import DEMO_PROFILE, require_root, run_factory
from tests.test_render import parse_hcl

SECRET_VARIABLE = {"vsphere-clone": "vsphere_password", "proxmox-clone": "proxmox_password"}


@pytest.fixture(scope="module", autouse=True)
def _needs_packer():
    require_root()


def packer_validate(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PKR_VAR_")}
    return subprocess.run(
        ["packer", "validate", "-var-file=image.pkrvars.hcl", "image.pkr.hcl"],
        cwd=folder,
        env={**clean, "CHECKPOINT_DISABLE": "1", **env},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("builder", sorted(REMOTE_BUILDERS))
def test_the_demo_renders_for_a_cluster_and_its_connection_never_reaches_disk(
    builder, demo_channel, tmp_path
):
    secret = f"never-on-disk-{uuid.uuid4().hex}"
    folder = tmp_path / builder
    result = run_factory(
        "render", str(DEMO_PROFILE), "--builder", builder, "--into", str(folder),
        "--outputs", str(tmp_path / "out"), env={f"PKR_VAR_{SECRET_VARIABLE[builder]}": secret},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"rendered and validated {folder}" in result.stdout

    for path in folder.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr

    template = parse_hcl((folder / "image.pkr.hcl").read_text())
    (source,) = template["source"]
    assert list(source) == [builder]
    variables = {name: body for block in template["variable"] for name, body in block.items()}
    for name in REMOTE_BUILDERS[builder]:
        assert "default" not in variables[name], name  # only from the environment
    assert variables[SECRET_VARIABLE[builder]]["sensitive"] is True
    # The whole build runs in the VM there: every stage, and the packages it installs.
    scripts = sorted(p.name for p in (folder / "provisioners").iterdir())
    assert {"10-system.sh", "20-conda-envs.sh", "60-admin.sh"} <= set(scripts)
    rendered = (folder / "image.pkr.hcl").read_text()
    assert all(f"provisioners/{name}" in rendered for name in scripts)
    assert any((folder / "payload" / "channel").rglob("*.conda")) or any(
        (folder / "payload" / "channel").rglob("*.tar.bz2")
    )
    assert (folder / "payload" / "SHA256SUMS").is_file()
    assert not (folder / "seed").exists()  # the cluster's template makes the build user

    # With the settings a team exports, packer validates it; with one of them missing, the
    # same packer refuses: the render holds no connection of its own.
    key = tmp_path / "build-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    settings = {f"PKR_VAR_{name}": value for name, value in REMOTE_BUILDERS[builder].items()}
    settings["PKR_VAR_build_ssh_key_file"] = str(key)
    accepted = packer_validate(folder, settings)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    missing = {k: v for k, v in settings.items() if k != f"PKR_VAR_{SECRET_VARIABLE[builder]}"}
    refused = packer_validate(folder, missing)
    assert refused.returncode != 0
    assert SECRET_VARIABLE[builder] in refused.stdout + refused.stderr


def test_proxmox_seals_in_its_last_step_without_powering_off(demo_channel, tmp_path):
    """Proxmox's builder has no shutdown command: the seal runs last and leaves the power-off
    to Proxmox's API."""
    folder = tmp_path / "render"
    result = run_factory(
        "render", str(DEMO_PROFILE), "--builder", "proxmox-clone", "--into", str(folder),
        "--outputs", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    build = parse_hcl((folder / "image.pkr.hcl").read_text())["build"][0]
    last = build["provisioner"][-1]["shell"]
    assert last["inline"] == ["sudo env FACTORY_SEAL_POWEROFF=0 bash /tmp/factory-payload/seal.sh"]
    (source,) = parse_hcl((folder / "image.pkr.hcl").read_text())["source"]
    assert "shutdown_command" not in source["proxmox-clone"]["image"]


def test_an_unknown_builder_is_one_line(tmp_path):
    result = run_factory("render", str(DEMO_PROFILE), "--builder", "vsphere-iso")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--builder" in result.stderr, result.stderr
