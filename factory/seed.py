"""NoCloud seeds: the cloud-init user-data and meta-data that give a VM its temporary login,
as plain files (Packer's cd_files makes the build's ISO) or as a seed.iso (tester boxes,
validation boots)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from factory import tools
from factory.errors import ToolError


def temporary_login(user: str, public_key: str) -> dict:
    """cloud-config for a key-only sudo user that exists while a VM is built or validated."""
    return {
        "users": [
            {
                "name": user,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "ssh_authorized_keys": [public_key],
            }
        ],
    }


def meta_data(instance_id: str, hostname: str) -> str:
    """NoCloud meta-data; a new instance-id makes cloud-init run its first-boot modules."""
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def write_seed_files(folder: Path, user_data: str, meta_data: str) -> tuple[Path, Path]:
    """folder/user-data and folder/meta-data, the two files a NoCloud seed holds."""
    folder.mkdir(parents=True, exist_ok=True)
    user_file, meta_file = folder / "user-data", folder / "meta-data"
    user_file.write_text(user_data)
    meta_file.write_text(meta_data)
    return user_file, meta_file


def write_seed_iso(folder: Path, user_data: str, meta_data: str) -> Path:
    """folder/seed.iso (label cidata) holding the two files, written with cloud-localds."""
    cloud_localds = tools.require("cloud-localds")
    user_file, meta_file = write_seed_files(folder, user_data, meta_data)
    seed = folder / "seed.iso"
    result = subprocess.run(
        [cloud_localds, str(seed), str(user_file), str(meta_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise ToolError(f"cloud-localds could not write {seed} (exit {result.returncode}): {last}")
    return seed
