"""Validate a delivery's container image: load NAME.oci.tar into podman, start a container with
its default command (Jupyter Lab), and run the environment, lock, Jupyter, kernel and notebook
checks through `podman exec`. What needs a whole machine (systemd units, sshd, the firewall,
nginx's TLS, the kernel and CPU it boots) is skipped, each with its reason."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from factory.delivery import Delivery
from factory.errors import ExitCode, FactoryError, InfrastructureError
from factory.profile import load_profile
from factory.validate.context import (
    SKIPPED,
    CheckContext,
    CheckResult,
    jupyter_token,
    result,
)
from factory.validate.jupyter import START_SECONDS, http_status_command
from factory.validate.report import write_reports
from factory.validate.run import ValidationOutcome, _delivery_locks, _write_exports
from factory.validate.suites import SUITES, planned_suites, run_all_checks
from factory.validate.target import CommandResult

# Beside the VM's reports, which `factory verify --profile` reads.
CONTAINER_REPORT_DIR = "container-validation"
# Groups a container runs as they are; "jupyter" gets the container's own check below.
CONTAINER_GROUPS = ("env", "lock", "kernels")
_WHY_SKIPPED = {
    "importer": "a container is not imported into a hypervisor",
    "cpu": "a container runs on the host's CPU, not the one a VM boots with",
    "cloud-init": "a container has no first boot (cloud-init is not run)",
    "sbom": "the image leaves out the kernel and bootloader files the SBOM lists",
    "https": "nginx's TLS front runs on the VM only; the container serves Jupyter itself",
    "ssh": "a container has no sshd",
    "firewall": "a container has no firewall of its own; the host publishes its ports",
    "services": "a container runs no systemd units",
    "monitoring": "a container runs no systemd units (node exporter, Prometheus)",
    "audit": "a container has no auditd",
    "updates": "updates come with a new image, not inside a container",
    "credentials": "needs the booted VM's users and sudoers; checked on the OVA",
    "hygiene": "needs the booted VM's machine-id and host keys; checked on the OVA",
    "offline": "a container's network is the host's to give",
    "gpu": "needs the VM's kernel driver",
}


def podman_base() -> list[str]:
    """podman, with runc when it is installed: crun cannot run on a host with hybrid
    cgroups, and runc works on every host podman supports."""
    podman = shutil.which("podman")
    if podman is None:
        raise InfrastructureError("validating a container needs podman; run `apt-get install -y "
                                  "podman runc`")  # fmt: skip
    return [podman, *(["--runtime", "runc"] if shutil.which("runc") else [])]


def rlimit_options() -> list[str]:
    """--ulimit values no higher than this process has: some hosts refuse to raise a limit,
    and podman's defaults would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = min(v for v in (soft, hard, 65536) if v != resource.RLIM_INFINITY)
    return ["--ulimit", f"nofile={files}:{files}", "--ulimit", "nproc=4096:4096"]


def _podman(*args: str, what: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [*podman_base(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise InfrastructureError(f"{what} failed: podman: {last}")
    return done.stdout


def archive_image_id(archive: Path) -> str:
    """The image ID podman gives an OCI archive (its config's digest), read from the tar."""
    try:
        with tarfile.open(archive) as tar:

            def blob(digest: str) -> dict:
                algorithm, value = digest.split(":", 1)
                member = tar.extractfile(f"blobs/{algorithm}/{value}")
                assert member is not None
                return json.load(member)

            index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
            manifest = blob(index["manifests"][0]["digest"])
            return manifest["config"]["digest"].split(":", 1)[1]
    except (OSError, tarfile.TarError, KeyError, ValueError, AssertionError) as error:
        raise FactoryError(
            f"{archive} is not an OCI archive ({error}); export it again with "
            "`factory export DELIVERY --format oci`"
        ) from None


class ContainerTarget:
    """A running container; commands run in it as root through `podman exec`."""

    def __init__(self, container: str, description: str) -> None:
        self.container = container
        self.user = "root"
        self.description = description

    def run(self, command: str, stdin: str | None = None, timeout: float = 600) -> CommandResult:
        try:
            done = subprocess.run(
                [*podman_base(), "exec", "-i", "--user", "root", self.container,
                 "bash", "-c", command],
                input=(stdin or "").encode(), capture_output=True, timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return CommandResult(124, "", f"timed out after {timeout:.0f} s")
        return CommandResult(
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )

    def close(self) -> None:
        pass


@contextlib.contextmanager
def started_container(archive: Path, log: Callable[[str], None] = print) -> Iterator[str]:
    """A container of the archive's image running its default command; the container, and
    the image when this loaded it, are removed afterwards."""
    image = archive_image_id(archive)
    loaded_here = subprocess.run([*podman_base(), "image", "exists", image]).returncode != 0
    if loaded_here:
        log(f"loading {archive.name} into podman")
        _podman("load", "--quiet", "--input", str(archive), what=f"loading {archive.name}")
    name = f"factory-validate-{secrets.token_hex(4)}"
    try:
        log(f"starting container {name}")
        _podman("run", "--detach", "--name", name, *rlimit_options(), image,
                what="starting the container")  # fmt: skip
        yield name
    finally:
        subprocess.run([*podman_base(), "rm", "--force", "--time", "10", name],
                       capture_output=True, check=False)  # fmt: skip
        if loaded_here:
            subprocess.run([*podman_base(), "rmi", "--force", image],
                           capture_output=True, check=False)  # fmt: skip


def check_container_jupyter(ctx: CheckContext) -> list[CheckResult]:
    """The default command serves Jupyter on the exposed port, as a non-root user, and wants
    the token the container made when it started."""
    jupyter = ctx.loaded.profile.jupyter
    group = "jupyter"
    if not jupyter.enabled:
        return [CheckResult("jupyter: disabled in profile", SKIPPED, "jupyter.enabled is false",
                            group=group)]  # fmt: skip
    url = f"http://127.0.0.1:{jupyter.port}/api/status"
    deadline, answer = time.monotonic() + START_SECONDS, ""
    while time.monotonic() < deadline:
        answer = ctx.target.run(http_status_command(url)).stdout.strip()
        if answer in ("200", "403"):
            break
        time.sleep(3)
    user = ctx.target.run("ps -o user= -p 1").stdout.strip()
    token = jupyter_token(ctx)
    authorised = ctx.target.run(
        http_status_command(url, headers_on_stdin=True),
        stdin=f"Authorization: token {token}\n",
    ).stdout.strip()
    return [
        result("jupyter: the default command runs as a non-root user",
               user not in ("", "root"), f"PID 1 user: {user or 'none'}", group),
        result("jupyter: answers on its port and wants a token", answer == "403",
               f"GET /api/status without token -> HTTP {answer or 'no answer'}", group),
        result("jupyter: answers with the token made at start", bool(token) and authorised == "200",
               f"GET /api/status with token -> HTTP {authorised}", group),
    ]  # fmt: skip


def container_suites(ctx: CheckContext) -> list[tuple[str, Callable[[], list[CheckResult]]]]:
    """planned_suites for a container: its checks kept, the Jupyter service check swapped
    for the container's, and one skipped result (with the reason) per machine-only group."""
    plan: list[tuple[str, Callable[[], list[CheckResult]]]] = []
    skipped: list[str] = ["importer"]  # the VM's run does it before planned_suites
    for group, suite in planned_suites(ctx):
        if group in CONTAINER_GROUPS:
            plan.append((group, suite))
        elif group == "jupyter":
            plan.append((group, lambda: check_container_jupyter(ctx)))
        elif group not in skipped:
            skipped.append(group)
    for group in skipped:
        reason = _WHY_SKIPPED.get(group, "needs the booted VM; checked on the OVA")
        skip = CheckResult(f"{group}: not checked in a container", SKIPPED, reason, group=group)
        plan.append((group, lambda skip=skip: [skip]))
    return plan


def validate_container(
    delivery: Path,
    *,
    profile_path: Path | None = None,
    report_dir: Path | None = None,
    log: Callable[[str], None] = print,
    only: tuple[str, ...] = SUITES,
) -> ValidationOutcome:
    """Run the delivery's container image and check what the profile promises of it."""
    folder = delivery.resolve()
    if not (folder / "profile.yaml").is_file():
        raise FactoryError(f"{folder} is not a delivery folder (no profile.yaml)")
    loaded = load_profile(profile_path or folder / "profile.yaml")
    parts = Delivery(folder, loaded.name)
    archive = folder / f"{loaded.name}.oci.tar"
    if not archive.is_file():
        error = FactoryError(
            f"{folder}: no {archive.name}; run `factory export {delivery} --format oci` first"
        )
        error.exit_code = ExitCode.BAD_INPUT
        raise error
    with started_container(archive, log) as container:
        target = ContainerTarget(container, f"container of {archive.name} (podman)")
        ctx = CheckContext(
            target=target,  # type: ignore[arg-type]
            loaded=loaded,
            throwaway_vm=True,  # removed afterwards; checks may change it
            locks=_delivery_locks(parts),
        )
        log("running checks")
        results = run_all_checks(ctx, only, plan=container_suites)
    out = report_dir or folder / CONTAINER_REPORT_DIR
    subject = {
        "name": loaded.name,
        "target": target.description,
        "oci": {"name": archive.name, "size": os.path.getsize(archive)},
        "profile": str(loaded.path),
    }
    reports = write_reports(results, out, subject)
    _write_exports(results, out)
    return ValidationOutcome(results, reports)
