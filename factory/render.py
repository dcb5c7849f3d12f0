"""Stage 3: render the Packer build directory from the shared templates.

The result is `<build>/`: image.pkr.hcl, image.pkrvars.hcl, the cloud-init seed, the
provisioner scripts and the small files of the payload. Every rendered HCL file is parsed back
with python-hcl2 and checked with `packer validate`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import hcl2
import yaml

from factory import cpu, gpu, host, image_layout, tools
from factory.errors import FactoryError
from factory.escape import cloud_config, hcl_string, shell_assignments
from factory.keys import KeyPair
from factory.profile import BUILD_USER, LoadedProfile
from factory.profile.paths import notebook_kernel
from factory.resolve import image_environments
from factory.resources import PROVISIONERS_DIR
from factory.seed import meta_data, temporary_login, write_seed_files
from factory.service_units import write_service_files
from factory.templates import render_template

# Ordered stages. The guest stages run in the build VM (the system layer); the host stages run
# after it, in a chroot of the image on the build host (factory/chain.py), one layer each.
GUEST_SCRIPTS = ["10-system.sh", "12-security.sh", "14-monitoring.sh", "15-gpu.sh", "30-jupyter.sh"]
CONDA_SCRIPT = "20-conda-envs.sh"
HOST_SCRIPTS = [
    CONDA_SCRIPT,
    "40-jupyter-client.sh",
    "45-services.sh",
    "47-snapshots.sh",
    "50-client-files.sh",
    "55-retention-updates.sh",
    "60-admin.sh",
]
JUPYTER_STAGES = ["30-jupyter.sh", "40-jupyter-client.sh", "45-services.sh", "50-client-files.sh"]
# The payload files the guest stages read: the only ones uploaded to the build VM.
GUEST_PAYLOAD_FILES = [
    "settings.sh",
    "seal.sh",
    "factory-firstboot",
    "factory-firstboot.service",
    "factory-rotate-token",
    "prometheus.yml",
]
PAYLOAD_FILES = [
    "install_env.py",
    "factory-env",
    "seal.sh",
    "factory-firstboot",
    "factory-firstboot.service",
    "factory-rotate-token",
]


@dataclass(frozen=True)
class BuildInputs:
    """Host-side facts the rendered build needs besides the profile."""

    base_image: str
    base_image_checksum: str
    accelerator: str
    output_directory: str
    console_log: str
    build_key: KeyPair
    packer_version: tuple[int, int, int] = (1, 6, 6)
    # Every stage in the build VM, the whole payload uploaded: the plain one-template build
    # (the benchmarks' baseline) instead of layers.
    all_in_guest: bool = False
    # The build VM's disk, when it is not the profile's: the system layer keeps a fixed size
    # and the conda layer grows the disk (factory.chain).
    disk_gib: int | None = None
    # The build VM's size on this host; decided once, in pre-flight (build_vm_size).
    vm: host.VMSize | None = None
    # Packer's builder: qemu here, or a client's own cluster (REMOTE_BUILDERS).
    builder: str = "qemu"

    @property
    def in_guest(self) -> bool:
        """Whether every stage runs in the build VM: a remote builder has no host stages."""
        return self.all_in_guest or self.builder != "qemu"


# The clusters a profile also renders for, each with its connection variables: set only in the
# environment at build time (PKR_VAR_<name>), never on disk. `packer validate` of a render gets
# these stand-ins where the environment has none.
REMOTE_BUILDERS = {
    "vsphere-clone": {
        "vsphere_server": "vcenter.invalid",
        "vsphere_username": "validate",
        "vsphere_password": "validate",
        "vsphere_datacenter": "datacenter",
        "vsphere_cluster": "cluster",
        "vsphere_datastore": "datastore",
        "vsphere_folder": "folder",
        "vsphere_base_template": "debian-12-cloud",
    },
    "proxmox-clone": {
        "proxmox_url": "https://proxmox.invalid:8006/api2/json",
        "proxmox_username": "validate@pve",
        "proxmox_password": "validate",
        "proxmox_node": "node",
        "proxmox_base_template": "debian-12-cloud",
    },
}
BUILDERS = ("qemu", *REMOTE_BUILDERS)


def build_vm_size(loaded: LoadedProfile) -> host.VMSize:
    """The build VM: the profile's hardware capped to this host, or its build_memory."""
    resources = loaded.profile.resources
    return host.local_vm_size(resources.cpus, resources.memory, resources.build_memory)


def stage_scripts(loaded: LoadedProfile, scripts: list[str]) -> list[str]:
    """The profile's share of `scripts`: no Jupyter stages without Jupyter, no GPU stage
    without a GPU."""
    if not loaded.profile.jupyter.enabled:
        scripts = [name for name in scripts if name not in JUPYTER_STAGES]
    if loaded.profile.gpu is None:
        scripts = [name for name in scripts if name != "15-gpu.sh"]
    return scripts


def guest_scripts(loaded: LoadedProfile, inputs: BuildInputs) -> list[str]:
    if inputs.in_guest:
        return stage_scripts(loaded, sorted(GUEST_SCRIPTS + HOST_SCRIPTS))
    return stage_scripts(loaded, GUEST_SCRIPTS)


def build_vm_needs_network(loaded: LoadedProfile) -> bool:
    """Whether a stage still downloads inside the build VM: the Prometheus server, or a GPU
    driver on a cloud image (a Debian base carries it in its base layer). Otherwise the VM runs
    cut off (QEMU restrict=on): no internet, and none of the host's loopback services."""
    profile = loaded.profile
    gpu_in_guest = profile.gpu is not None and not isinstance(profile.base, str)
    return not profile.offline and (profile.monitoring.prometheus or gpu_in_guest)


def render_packer_template(loaded: LoadedProfile, inputs: BuildInputs, payload: Path) -> str:
    if inputs.in_guest:
        uploads = [""]
    else:
        uploads = [name for name in GUEST_PAYLOAD_FILES if (payload / name).is_file()]
    return render_template(
        "image.pkr.hcl.j2",
        builder=inputs.builder,
        payload_dir=str(image_layout.PAYLOAD_DIR),
        guest_network=build_vm_needs_network(loaded),
        modern_packer=inputs.packer_version >= (1, 7, 0),
        uploads=uploads,
        scripts=[f"provisioners/{name}" for name in guest_scripts(loaded, inputs)],
    )


def render_pkrvars(loaded: LoadedProfile, inputs: BuildInputs) -> str:
    resources = loaded.profile.resources
    vm = inputs.vm or build_vm_size(loaded)
    values: dict[str, str | int] = {
        "vm_name": f"{loaded.name}.qcow2",
        "delivery_name": loaded.name,
        "base_image": inputs.base_image,
        "base_image_checksum": inputs.base_image_checksum,
        "accelerator": inputs.accelerator,
        "cpus": vm.cpus,
        "memory": vm.memory_mib,
        "cpu_model": cpu.build_cpu_model(inputs.accelerator),
        "disk_size": f"{inputs.disk_gib or resources.disk}G",
        "output_directory": inputs.output_directory,
        "build_user": BUILD_USER,
        "console_log": inputs.console_log,
        "description": loaded.profile.description,
        "industry": loaded.profile.industry,
    }
    lines = ["# Generated by factory render. Do not edit."]
    for key, value in values.items():
        rendered = str(value) if isinstance(value, int) else hcl_string(value)
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


def render_seed(loaded: LoadedProfile, inputs: BuildInputs) -> dict[str, str]:
    user_data = cloud_config(
        {**temporary_login(BUILD_USER, inputs.build_key.public_key), "ssh_pwauth": False}
    )
    hostname = loaded.name.replace("_", "-")
    return {
        "user-data": user_data,
        "meta-data": meta_data(f"factory-build-{hostname}", hostname),
    }


def render_settings(loaded: LoadedProfile) -> str:
    profile = loaded.profile
    return shell_assignments(
        {
            "FACTORY_NAME": loaded.name,
            "FACTORY_DESCRIPTION": profile.description,
            "FACTORY_INDUSTRY": profile.industry,
            "ADMIN_USER": profile.admin.user,
            "BUILD_USER": BUILD_USER,
            "ENVIRONMENTS": " ".join(env.name for env in image_environments(loaded)),
            "JUPYTER_ENABLED": int(profile.jupyter.enabled),
            "JUPYTER_PORT": profile.jupyter.port,
            "OFFLINE": int(profile.offline),
            "INSTALLER": profile.conda.installer,
            "FIREWALL": int(profile.security.firewall),
            "OPEN_PORTS": " ".join(map(str, profile.open_ports())),
            "UNATTENDED_UPGRADES": int(profile.security.unattended_upgrades),
            "AUDIT_RETENTION_DAYS": profile.security.audit_retention_days,
            "MONITORING_ENABLED": int(profile.monitoring.enabled),
            "PROMETHEUS": int(profile.monitoring.prometheus),
            "GPU_DRIVER": profile.gpu.driver if profile.gpu else "",
            "GPU_CUDA": profile.gpu.cuda if profile.gpu else "",
            "GPU_TOOLKIT": int(bool(profile.gpu and profile.gpu.toolkit)),
            # What 15-gpu.sh installs on a Debian image that lacks it (the base layer has it).
            "DEBIAN_GPU_PACKAGES": " ".join(gpu.DEBIAN_GPU_PACKAGES),
            **image_layout.settings(),
        }
    )


def render_build_dir(
    loaded: LoadedProfile, inputs: BuildInputs, build_dir: Path, validate: bool = True
) -> Path:
    """Write the complete build directory and parse it back; with `validate`, also run
    `packer validate` (a build does that only when it runs packer). Return its path."""
    build_dir.mkdir(parents=True, exist_ok=True)
    payload = build_dir / "payload"
    payload.mkdir(exist_ok=True)
    for name in PAYLOAD_FILES:
        shutil.copy2(PROVISIONERS_DIR / name, payload / name)
    (payload / "settings.sh").write_text(render_settings(loaded))
    (payload / "admin_authorized_keys").write_text("\n".join(loaded.profile.admin.ssh_keys) + "\n")
    write_client_files(loaded, payload)
    (build_dir / "image.pkr.hcl").write_text(render_packer_template(loaded, inputs, payload))
    (build_dir / "image.pkrvars.hcl").write_text(render_pkrvars(loaded, inputs))
    if inputs.builder == "qemu":  # a cluster's template makes its own build user
        seed = render_seed(loaded, inputs)
        write_seed_files(build_dir / "seed", seed["user-data"], seed["meta-data"])
    scripts = build_dir / "provisioners"
    scripts.mkdir(exist_ok=True)
    for name in stage_scripts(loaded, GUEST_SCRIPTS + HOST_SCRIPTS):
        shutil.copy2(PROVISIONERS_DIR / name, scripts / name)
    parse_hcl_files(build_dir)
    if validate:
        packer_validate(
            build_dir, inputs.build_key.private_key_file, REMOTE_BUILDERS.get(inputs.builder, {})
        )
    return build_dir


def sample_notebook(path: Path, environments: list[str]) -> str:
    """A sample notebook set to open with its own environment's kernel (notebook_kernel)."""
    notebook = json.loads(path.read_text())
    kernel = notebook_kernel(notebook, environments)
    notebook.setdefault("metadata", {})["kernelspec"] = {
        "name": kernel,
        "display_name": f"Python ({kernel})",
        "language": "python",
    }
    return json.dumps(notebook, indent=1) + "\n"


def prometheus_config(loaded: LoadedProfile) -> str:
    """Scrape config for the optional Prometheus server on the image."""
    jobs = [{"job_name": "node", "static_configs": [{"targets": ["127.0.0.1:9100"]}]}]
    if loaded.profile.jupyter.enabled:
        jobs.append(
            {
                "job_name": "jupyter",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{loaded.profile.jupyter.port}"]}],
            }
        )
    config = {"global": {"scrape_interval": "30s"}, "scrape_configs": jobs}
    return "# Generated by factory render.\n" + yaml.safe_dump(config, sort_keys=False)


def write_client_files(loaded: LoadedProfile, payload: Path) -> None:
    """Notebooks, the client's TLS files and the Prometheus config, where the profile has them."""
    profile = loaded.profile
    notebooks = payload / "notebooks"
    notebooks.mkdir(exist_ok=True)
    environments = [env.name for env in profile.environments]
    for source in map(Path, profile.notebooks):
        (notebooks / source.name).write_text(sample_notebook(source, environments))
    if profile.jupyter.tls is not None:
        tls = payload / "tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(profile.jupyter.tls.certificate, tls / "jupyter.crt")
        key = tls / "jupyter.key"
        key.touch(mode=0o600)
        shutil.copyfile(profile.jupyter.tls.key, key)
    if profile.monitoring.prometheus:
        (payload / "prometheus.yml").write_text(prometheus_config(loaded))
    write_service_files(loaded, payload)


def parse_hcl_files(build_dir: Path) -> dict[str, dict]:
    """Parse every rendered HCL file back; a parse error is a bug in a template."""
    parsed = {}
    for path in sorted(build_dir.glob("*.hcl")):
        try:
            parsed[path.name] = hcl2.loads(path.read_text())
        except Exception as error:
            raise FactoryError(f"{path}: rendered HCL does not parse ({error})") from None
    return parsed


def packer_env(key_file: Path) -> dict[str, str]:
    """Environment for packer: the sensitive key path travels here, never on argv."""
    env = dict(os.environ)
    env["PKR_VAR_build_ssh_key_file"] = str(key_file)
    env["CHECKPOINT_DISABLE"] = "1"
    env["PACKER_NO_COLOR"] = "1"
    return env


def packer_validate(
    build_dir: Path, key_file: Path, stand_ins: dict[str, str] | None = None
) -> None:
    """`packer validate` on a rendered folder; `stand_ins` fill the connection variables the
    environment does not set (a remote builder's, for the check only)."""
    packer = tools.require("packer")
    env = packer_env(key_file)
    for name, value in (stand_ins or {}).items():
        env.setdefault(f"PKR_VAR_{name}", value)
    result = subprocess.run(
        [packer, "validate", "-var-file=image.pkrvars.hcl", "image.pkr.hcl"],
        cwd=build_dir,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        detail = " ".join((result.stdout + result.stderr).split())[:400]
        raise FactoryError(f"packer validate rejected {build_dir}/image.pkr.hcl: {detail}")
