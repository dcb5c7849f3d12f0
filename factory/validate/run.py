"""Run the checks: against the delivery's OVA booted on a throwaway overlay, or against a live
host. Results go to report.json, report.xml (JUnit) and report.html; what each environment
really holds goes to envs/."""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from factory import host, kvm
from factory.cache import sha256_file
from factory.cpu import validation_cpu
from factory.delivery import Delivery
from factory.errors import FactoryError
from factory.profile import ENV_NAME, LoadedProfile, load_profile
from factory.updates import SecurityIndex
from factory.validate.agent import GuestAgent, admit_login
from factory.validate.boot import VALIDATOR_USER, boot_delivery, extract_ova_disk
from factory.validate.context import FAILED, PASSED, CheckContext, CheckResult
from factory.validate.importer import check_importer, served_ports
from factory.validate.recording import Recording, RecordingTarget, recording_path
from factory.validate.report import write_reports
from factory.validate.suites import SUITES, partial, run_all_checks
from factory.validate.target import LocalTarget, Target, connect

LOCAL_HOST = "local"


@dataclass(frozen=True)
class ValidationOutcome:
    results: list[CheckResult]
    reports: list[Path]
    boot_seconds: float | None = None

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == FAILED]


def _open_delivery(folder: Path) -> Delivery:
    """The delivery in `folder`, named after its one OVA (the folder may have been renamed on
    its way to the client)."""
    ovas = sorted(folder.glob("*.ova"))
    if len(ovas) != 1:
        raise FactoryError(f"{folder}: expected one .ova, found {len(ovas)}; run `factory build`")
    return Delivery(folder, ovas[0].stem)


def validate_delivery(
    delivery: Path,
    *,
    profile_path: Path | None = None,
    accelerator: str = "auto",
    report_dir: Path | None = None,
    log=print,
    only: tuple[str, ...] = SUITES,
) -> ValidationOutcome:
    """Boot the delivery's OVA disk on an overlay, as the client does (no seed disk), check
    what an importer meets, let the validator in through the guest agent, and run every check
    of the profile."""
    parts = _open_delivery(delivery.resolve())
    delivery, ova = parts.path, parts.ova
    loaded = load_profile(profile_path or parts.profile)
    accel = kvm.choose_accelerator(accelerator)
    probe_port = unlisted_port(loaded)
    log(f"reading {ova.name}'s sha256 for the report")
    ova_sha256 = sha256_file(ova)  # a rerun's `factory verify --profile` matches it
    with tempfile.TemporaryDirectory(prefix="factory-ova-") as scratch:
        log(f"extracting the disk from {ova.name}")
        disk = extract_ova_disk(ova, Path(scratch))
        resources = loaded.profile.resources
        vm_size = host.local_vm_size(min(resources.cpus, 2), resources.memory)
        cpu_choice = validation_cpu(loaded.profile.cpu_baseline, accel)
        log(f"CPU: {cpu_choice.describe()} for cpu_baseline {cpu_choice.promised}")
        with boot_delivery(
            disk,
            vm_size.memory_mib,
            vm_size.cpus,
            accel,
            cpu_model=cpu_choice.qemu_cpu,
            # No check needs the internet; cut off, the guest cannot reach the host's loopback.
            restrict_network=True,
            forward_ports=[*loaded.profile.open_ports(), *served_ports(loaded), probe_port],
            seed=False,  # as the client boots it: cloud-init finds no datasource
            log=log,
        ) as vm:
            log(f"host keys read from the console after {vm.boot_seconds:.0f} s")
            assert vm.agent_socket is not None
            agent = GuestAgent(vm.agent_socket, time.monotonic() + 300)
            try:
                first = []
                if "importer" in only:
                    log("checking what an importer meets, before anyone logs in")
                    first = _importer_checks(vm, loaded, agent)
                log("letting the validator in through the guest agent")
                admit_login(agent, VALIDATOR_USER, vm.key.public_key)
            finally:
                agent.close()
            target = connect(
                "127.0.0.1",
                vm.ssh_port,
                VALIDATOR_USER,
                vm.key.private_key_file,
                vm.host_keys,
                time.monotonic() + 600,
                forwards=vm.forwards,
            )
            if record := recording_path():
                recording = Recording(record)
                recording.entry("meta", "unlisted_port", probe_port)
                recording.entry("meta", "accelerator", accel)
                target = RecordingTarget(target, recording)
            try:
                login = CheckResult(
                    "ssh: login with the pinned host key",
                    PASSED,
                    f"{len(vm.host_keys)} host key(s) pinned from the console",
                    group="boot",
                )
                ctx = CheckContext(
                    target=target,
                    loaded=loaded,
                    throwaway_vm=True,
                    locks=_delivery_locks(parts),
                    unlisted_port=probe_port,
                    extra={
                        "cpu": cpu_choice,
                        **_delivery_security_index(parts),
                        **_delivery_sbom(parts),
                    },
                )
                log("running checks")
                results = [*first, login, *run_all_checks(ctx, only)]
            finally:
                target.close()
        boot_seconds = vm.boot_seconds
    subject = {
        "name": loaded.name,
        "target": f"{ova.name} booted under {accel}",
        "ova": {"name": ova.name, "sha256": ova_sha256},
        "cpu": {
            "model": cpu_choice.model,
            "booted_level": cpu_choice.level,
            "cpu_baseline": cpu_choice.promised,
            "vendor_id": cpu_choice.vendor_id,
            "accelerator": accel,
        },
        "profile": str(loaded.path),
    }
    if groups := partial(only):
        subject["only"] = groups  # `factory verify --profile` tells a partial validation apart
    reports = write_reports(results, report_dir or delivery, subject)
    _write_exports(results, report_dir or delivery)
    return ValidationOutcome(results, reports, boot_seconds)


def unlisted_port(loaded: LoadedProfile) -> int:
    """A port the profile does not open, to prove the firewall drops it."""
    return next(p for p in range(7777, 8000) if p not in loaded.profile.open_ports())


def _importer_checks(vm, loaded, agent) -> list[CheckResult]:
    try:
        return check_importer(vm, loaded, agent)
    except (FactoryError, OSError) as error:
        return [CheckResult("importer: boots without a seed", FAILED, str(error), group="importer")]


def _delivery_security_index(delivery: Delivery) -> dict:
    """{"security_index": the index the image was upgraded against (None: it had none)}, or
    {} for a delivery made before factory recorded one."""
    path = delivery.security_index
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {"security_index": SecurityIndex.from_json(data) if data else None}


def _delivery_sbom(delivery: Delivery) -> dict:
    """{"sbom": its path}, or {} for a delivery made before factory wrote one."""
    return {"sbom": delivery.sbom} if delivery.sbom.is_file() else {}


def _delivery_locks(delivery: Delivery) -> list[dict]:
    """The delivery's lock files; a name that is not an environment name is refused, since it
    reaches remote commands and file names."""
    locks = []
    for path in sorted(delivery.locks.glob("*.lock.json")):
        lock = json.loads(path.read_text())
        if not isinstance(lock, dict) or not ENV_NAME.match(str(lock.get("name", ""))):
            raise FactoryError(
                f"{path}: `name` is not an environment name; the delivery was edited: rebuild it"
            )
        locks.append(lock)
    return locks


def _write_exports(results: list[CheckResult], out_dir: Path) -> None:
    """Save what each environment really holds, as read back from the booted image."""
    exports = [r.data for r in results if r.data and "installed" in r.data]
    if not exports:
        return
    folder = out_dir / "envs"
    folder.mkdir(parents=True, exist_ok=True)
    for export in exports:
        name, installed = export["environment"], export["installed"]
        if not ENV_NAME.match(name):
            raise FactoryError(f"environment name {name!r} cannot name a file; rebuild")
        (folder / f"{name}.installed.json").write_text(json.dumps(installed, indent=2) + "\n")
        freeze = "".join(f"{n}=={v}\n" for n, v in sorted(installed["pip"].items()))
        (folder / f"{name}.pip-freeze.txt").write_text(freeze)


HOST_ADDRESS = re.compile(
    r"^(?P<user>[a-z_][a-z0-9_.-]{0,31})@"
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))(?::(?P<port>\d{1,5}))?$"
)


def parse_host(address: str) -> tuple[str, str, int]:
    """(user, host, port) of `user@host[:port]` or `user@[ipv6][:port]`."""
    match = HOST_ADDRESS.match(address)
    port = int(match.group("port") or 22) if match else 0
    if not match or not 1 <= port <= 65535:
        raise FactoryError(
            f"--host {address!r}: expected user@address[:port] (port 1-65535; IPv6 in "
            "brackets) or 'local'"
        )
    return match.group("user"), match.group("ipv6") or match.group("host"), port


def validate_host(
    address: str,
    *,
    profile_path: Path,
    key_file: Path | None,
    report_dir: Path,
    log=print,
    only: tuple[str, ...] = SUITES,
    delivery: Path | None = None,
) -> ValidationOutcome:
    """Run the same checks against a live machine: over SSH (host keys from known_hosts),
    or on this machine itself when `address` is LOCAL_HOST. Given the `delivery` it was made
    from, its locks and SBOM are checked too: what changed since it was delivered."""
    loaded: LoadedProfile = load_profile(profile_path)
    parts = _open_delivery(delivery.resolve()) if delivery is not None else None
    target: Target
    if address == LOCAL_HOST:
        target = LocalTarget()
    else:
        user, hostname, port = parse_host(address)
        log(f"connecting to {address}")
        target = connect(hostname, port, user, key_file, None, time.monotonic() + 60)
    if record := recording_path():
        target = RecordingTarget(target, Recording(record))
    log(f"running checks on {target.description}")
    try:
        ctx = CheckContext(
            target=target,
            loaded=loaded,
            throwaway_vm=False,
            locks=_delivery_locks(parts) if parts else [],
            extra=_delivery_sbom(parts) if parts else {},
        )
        results = run_all_checks(ctx, only)
    finally:
        target.close()
    subject = {"name": loaded.name, "target": target.description, "profile": str(loaded.path)}
    return ValidationOutcome(results, write_reports(results, report_dir, subject))
