"""The files that turn a profile's `services` and `snapshots` into systemd units and nginx
locations, written into the build payload (render stage); provisioners/45-services.sh and
47-snapshots.sh install them in the client layer."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

from factory import image_layout
from factory.escape import systemd_word
from factory.profile import LoadedProfile
from factory.profile.services import Service, Snapshots
from factory.templates import render_template

SNAPSHOT_UNIT = "factory-snapshot"
_CALENDAR = {"hourly": "hourly", "daily": "daily", "weekly": "weekly"}


def service_unit_name(service: Service) -> str:
    return f"factory-service-{service.name}"


def _exec_start(service: Service, env_prefix: PurePosixPath) -> str:
    program, *arguments = service.command
    if "/" not in program:
        program = str(env_prefix / "bin" / program)
    return " ".join(systemd_word(word) for word in [program, *arguments])


def render_service(service: Service) -> dict[str, str]:
    """A service's unit, nginx location and list of first-boot secrets, by file name."""
    env_prefix = image_layout.CONDA_ENVS / service.environment
    unit = render_template(
        "service.unit.j2",
        service=service.name,
        user=service.user,
        folder=str(image_layout.SERVICES_DIR / service.name),
        env_prefix=str(env_prefix),
        port=service.port,
        variables=[
            systemd_word(f"{name}={value}")
            for name, value in sorted(service.environment_variables.items())
        ],
        secrets=service.secrets,
        secrets_file=str(image_layout.SERVICES_CONFIG_DIR / f"{service.name}.env"),
        command=_exec_start(service, env_prefix),
    )
    nginx = render_template("service-nginx.conf.j2", service=service.name, port=service.port)
    return {
        f"{service_unit_name(service)}.service": unit,
        "nginx.conf": nginx,
        "secrets": "".join(f"{name}\n" for name in service.secrets),
        "user": service.user + "\n",
    }


def render_snapshot_units(snapshots: Snapshots) -> dict[str, str]:
    """The timer that takes a snapshot `every` period, and the service it starts."""
    service = (
        "# Installed by factory: a snapshot of every environment and the user-facing "
        "configuration.\n[Unit]\nDescription=factory environment snapshot\n\n[Service]\n"
        f"Type=oneshot\nExecStart=/usr/local/bin/factory-env snapshot --keep {snapshots.keep}\n"
    )
    timer = (
        "# Installed by factory.\n[Unit]\nDescription=factory environment snapshots "
        f"({snapshots.every}, {snapshots.keep} kept)\n\n[Timer]\n"
        f"OnCalendar={_CALENDAR[snapshots.every]}\nPersistent=true\nRandomizedDelaySec=15m\n\n"
        "[Install]\nWantedBy=timers.target\n"
    )
    return {f"{SNAPSHOT_UNIT}.service": service, f"{SNAPSHOT_UNIT}.timer": timer}


def write_service_files(loaded: LoadedProfile, payload: Path) -> None:
    """payload/services/<name>/ with the unit, nginx location, secrets and files of each
    service; payload/snapshots/ with the snapshot units."""
    profile = loaded.profile
    for service in profile.services:
        folder = payload / "services" / service.name
        (folder / "files").mkdir(parents=True, exist_ok=True)
        for name, text in render_service(service).items():
            (folder / name).write_text(text)
        for source in map(Path, service.files):
            shutil.copyfile(source, folder / "files" / source.name)
    if profile.snapshots is not None:
        folder = payload / "snapshots"
        folder.mkdir(exist_ok=True)
        for name, text in render_snapshot_units(profile.snapshots).items():
            (folder / name).write_text(text)
