"""Stage 4: build the image with Packer's QEMU builder and publish the delivery.

Everything happens in a private staging folder next to outputs/<name>/. The delivery folder
appears, by a rename, only when the whole build and export succeeded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from factory import assemble, base, cpu, export, gpu, host, updates
from factory.bundle import build_payload, fetch_conda_installer
from factory.cache import sha256_file
from factory.errors import FactoryError, ToolError
from factory.handover import write_handover
from factory.keys import ephemeral_keypair
from factory.processes import die_with_parent
from factory.profile import LoadedProfile
from factory.progress import Progress
from factory.render import BuildInputs, build_vm_size, packer_env, render_build_dir
from factory.resolve import lock_dir_for, lock_profile

# Payload parts the host-side install uses and the build VM never needs.
HOST_ONLY_PAYLOAD_DIRS = ["channel", "wheels", "installer", "conda-installer"]
# Payload parts left out of the delivery's copy of the build folder: large, or secret.
UNDELIVERED_PAYLOAD_DIRS = [*HOST_ONLY_PAYLOAD_DIRS, "tls"]
# The whole `packer build`; each provisioner also has its own limit in the template.
PACKER_TIME_LIMIT_MINUTES = 240


@dataclass(frozen=True)
class BuildOptions:
    outputs: Path
    accelerator: str = "auto"
    force: bool = False
    ova_digest: str = export.DEFAULT_OVA_DIGEST
    time_limit_minutes: float = PACKER_TIME_LIMIT_MINUTES


def delivery_dir(outputs: Path, loaded: LoadedProfile) -> Path:
    return outputs / loaded.name


@contextlib.contextmanager
def build_lock(outputs: Path, name: str) -> Iterator[None]:
    """One build per delivery name at a time; a second one refuses at once."""
    outputs.mkdir(parents=True, exist_ok=True)
    lock_path = outputs / f".{name}.lock"
    # Never truncate or follow a link planted in a shared outputs/.
    try:
        descriptor = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise FactoryError(
            f"cannot open the build lock {lock_path}: {error.strerror}; remove it if it is a link"
        ) from None
    with open(descriptor, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FactoryError(
                f"another build of {name} is running (lock {lock_path}); wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# What the Debian base image holds before any environment is installed.
BASE_CONTENT_GIB = 1.5


def check_free_disk(outputs: Path, loaded: LoadedProfile, payload_gib: float = 0.0) -> None:
    """Refuse early when the build could fill the disk. The disk images are sparse: at its
    peak the build holds the assembled image and packer's copy of it, each the base plus the
    installed environments (about three times their packages, with the offline copies), never
    more than the profile's disk; the export needs room beside them."""
    content = BASE_CONTENT_GIB + 3 * payload_gib
    needed_gib = round(min(loaded.profile.resources.disk, 2 * content) + 2, 1)
    free_gib = shutil.disk_usage(outputs).free / 2**30
    if free_gib < needed_gib:
        raise FactoryError(
            f"{outputs} has {free_gib:.1f} GiB free but building {loaded.name} needs about "
            f"{needed_gib} GiB (its image twice, with {payload_gib:.1f} GiB of packages, and "
            "room to export); free some space or use --outputs elsewhere"
        )


def payload_size_gib(payload: Path) -> float:
    return sum(p.stat().st_size for p in payload.rglob("*") if p.is_file()) / 2**30


def gpu_base_packages(loaded: LoadedProfile) -> tuple[str, ...]:
    """A Debian GPU profile's driver goes into its own base layer: DKMS builds the module
    for the image's kernel there, at the host's speed, before any kernel change."""
    target = loaded.profile.gpu
    if target is None or loaded.profile.base != "debian-12":
        return ()
    toolkit = ("nvidia-cuda-toolkit",) if target.toolkit else ()
    return (*gpu.DEBIAN_GPU_PACKAGES, *toolkit)


def base_image_for(loaded: LoadedProfile, progress: Progress) -> Path:
    progress.set_stage("base image")
    spec = loaded.profile.base
    if isinstance(spec, str):
        return base.debian_base_image(
            spec, log=progress.log, extra_packages=gpu_base_packages(loaded)
        )
    return base.cloud_base_image(spec.url, spec.sha256, log=progress.log)


_PACKER_STEPS = [
    (
        re.compile(r"Starting VM|Starting HTTP server|Copying hard drive|Resizing hard drive"),
        "preparing the build VM",
    ),
    (re.compile(r"Waiting for SSH"), "booting the base image (waiting for SSH)"),
    (re.compile(r"Connected to SSH"), "connected over SSH"),
    (re.compile(r"Uploading payload"), "uploading the payload"),
    (re.compile(r"factory-step: (.+)"), None),
    (re.compile(r"Gracefully halting"), "sealing and shutting down"),
    (re.compile(r"Converting hard drive|Compressing"), "compressing the disk"),
]


def _packer_message(line: str) -> str | None:
    """The human text of one -machine-readable line, or None for non-UI records."""
    fields = line.rstrip("\n").split(",", 3)
    if len(fields) < 4 or fields[2] != "ui":
        return None
    kind, _, text = fields[3].partition(",")
    text = text.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "")
    return text if kind in ("say", "message", "error") else None


def _step_of(text: str) -> str | None:
    for pattern, label in _PACKER_STEPS:
        match = pattern.search(text)
        if match:
            return label or match.group(1).strip()
    return None


def run_packer(
    build_dir: Path,
    key_file: Path,
    log_path: Path,
    progress: Progress,
    time_limit_minutes: float = PACKER_TIME_LIMIT_MINUTES,
) -> None:
    """Run `packer build`, streaming its log to a file and its steps to the progress line.
    Past `time_limit_minutes` packer and everything it started are stopped."""
    progress.set_stage("packer build")
    command = ["packer", "build", "-machine-readable", "-on-error=cleanup"]
    command += ["-var-file=image.pkrvars.hcl", "image.pkr.hcl"]
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            command,
            cwd=build_dir,
            env=packer_env(key_file),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        expired = threading.Event()

        def stop_at_time_limit() -> None:
            expired.set()
            _stop_process_group(process)

        watchdog = threading.Timer(time_limit_minutes * 60, stop_at_time_limit)
        watchdog.daemon = True
        watchdog.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                text = _packer_message(line)
                if text is None:
                    continue
                log.write(text + "\n")
                log.flush()
                step = _step_of(text)
                if step:
                    progress.update(step)
                else:
                    progress.refresh()
            code = process.wait()
        except BaseException:
            watchdog.cancel()
            _stop_process_group(process)
            raise
        watchdog.cancel()
    if expired.is_set():
        watchdog.join()  # until packer's whole process group is gone
        raise FactoryError(
            f"packer build ran past its time limit of {time_limit_minutes:g} min and was "
            f"stopped; see {log_path.name} in the build logs kept in outputs/logs/; if it was "
            "only slow, raise --time-limit"
        )
    if code != 0:
        # The staging folder goes; keep_failure_logs saves the log under outputs/logs/.
        raise ToolError(
            f"packer build failed (exit {code}); see {log_path.name} in the build logs kept "
            "in outputs/logs/"
        )


def _stop_process_group(process: subprocess.Popen) -> None:
    """Ask packer to clean up (it stops QEMU), then make sure nothing of it survives."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def tool_versions() -> dict[str, str]:
    versions = {}
    packer = host.packer_version()
    versions["packer"] = ".".join(map(str, packer)) if packer else "unknown"
    for tool in ("qemu-system-x86_64", "qemu-img"):
        result = subprocess.run([tool, "--version"], capture_output=True, text=True)
        versions[tool] = result.stdout.splitlines()[0] if result.returncode == 0 else "unknown"
    from importlib import metadata

    versions["py-rattler"] = metadata.version("py-rattler")
    return versions


def build_image(loaded: LoadedProfile, options: BuildOptions) -> Path:
    """Run the whole build for one profile and return the published delivery folder."""
    started = datetime.now(UTC)
    options = BuildOptions(**{**vars(options), "outputs": options.outputs.resolve()})
    final = delivery_dir(options.outputs, loaded)
    with build_lock(options.outputs, loaded.name):
        if final.exists() and not options.force:
            raise FactoryError(
                f"{final} already holds a delivery of {loaded.name}; bump `version` in "
                f"{loaded.path.name} or pass --force to replace it"
            )
        check_free_disk(options.outputs, loaded)
        assemble.check_host()
        resources = loaded.profile.resources
        vm = build_vm_size(loaded)
        accelerator = host.choose_accelerator(options.accelerator)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{loaded.name}-", dir=options.outputs))
        try:
            with Progress() as progress:
                progress.set_stage("pre-flight")
                progress.update(f"accelerator {accelerator}")
                progress.log(
                    f"build VM: {vm.cpus} CPUs, {vm.memory_mib} MiB, CPU model "
                    f"{cpu.build_cpu_model(accelerator)} (the delivered VM: {resources.cpus} "
                    f"CPUs, {resources.memory} MiB)"
                )
                locks = lock_profile(loaded, log=progress.log)
                source = loaded.profile.conda.installer_source()
                conda_installer = None  # fetched (and checked) before anything boots
                if source is not None:
                    conda_installer = fetch_conda_installer(*source, log=progress.log)
                base_image = base_image_for(loaded, progress)
                packer_base = staging / "assembled.qcow2"
                with ephemeral_keypair(f"factory-build@{loaded.name}") as key:
                    inputs = BuildInputs(
                        base_image=str(packer_base),
                        # Made in this staging folder just below, from the verified base.
                        base_image_checksum="none",
                        accelerator=accelerator,
                        output_directory=str(staging / "packer-output"),
                        console_log=str(staging / "console.log"),
                        build_key=key,
                        packer_version=host.packer_version() or (1, 6, 6),
                        host_stages=(assemble.HOST_STAGE,),
                        vm=vm,
                    )
                    progress.set_stage("render")
                    build_dir = render_build_dir(loaded, inputs, staging / "build")
                    progress.set_stage("bundle")
                    build_payload(
                        locks,
                        build_dir / "payload",
                        log=progress.log,
                        conda_installer=conda_installer,
                    )
                    check_free_disk(
                        options.outputs, loaded, payload_size_gib(build_dir / "payload")
                    )
                    progress.set_stage("environments")
                    assemble.assemble_environments(
                        base_image,
                        loaded.profile.resources.disk,
                        build_dir,
                        staging,
                        log=progress.update,
                        log_file=staging / "build.log",
                    )
                    for name in HOST_ONLY_PAYLOAD_DIRS:
                        shutil.rmtree(build_dir / "payload" / name, ignore_errors=True)
                    run_packer(
                        build_dir,
                        key.private_key_file,
                        staging / "build.log",
                        progress,
                        options.time_limit_minutes,
                    )
                progress.set_stage("export")
                artifacts = export_delivery(loaded, staging, options, progress)
            finished = datetime.now(UTC)
            export.write_build_manifest(
                staging / "delivery",
                profile_sha256=loaded.sha256,
                artifacts=artifacts,
                tool_versions=tool_versions(),
                started=started,
                finished=finished,
                extra={
                    "name": loaded.name,
                    "accelerator": accelerator,
                    "security_index": security_index_summary(staging / updates.INDEX_FILE),
                },
            )
            if loaded.profile.jupyter.tls:
                keep_private(staging / "delivery", artifacts)
            publish(staging, final)
        except BaseException:
            kept = keep_failure_logs(staging, options.outputs, loaded.name)
            if kept:
                print(f"build logs kept in {kept}", file=sys.stderr)
            raise
        finally:
            base.remove_unless_mounted(staging, log=lambda line: print(line, file=sys.stderr))
    return final


def virtual_hardware(loaded: LoadedProfile) -> export.VirtualHardware:
    resources = loaded.profile.resources
    return export.VirtualHardware(
        name=loaded.name,
        cpus=resources.cpus,
        memory_mib=resources.memory,
        disk_gib=resources.disk,
        description=loaded.profile.description,
    )


def export_delivery(
    loaded: LoadedProfile, staging: Path, options: BuildOptions, progress: Progress
) -> list[Path]:
    """Turn the packer output into the delivery folder's artifacts."""
    delivery = staging / "delivery"
    delivery.mkdir()
    built = staging / "packer-output" / f"{loaded.name}.qcow2"
    hardware = virtual_hardware(loaded)
    # Both conversions compress on one core each: run them side by side.
    progress.update("writing the OVA and the compressed qcow2")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        compressing = pool.submit(export.export_qcow2, built, delivery, loaded.name, progress.log)
        ova = export.export_ova(
            built, hardware, delivery, digest=options.ova_digest, log=progress.log
        )
        qcow2 = compressing.result()
    built.unlink()
    artifacts = [ova, qcow2]
    export.write_checksums(delivery, artifacts)
    write_delivered_profile(loaded, delivery)
    write_handover(loaded, delivery)
    shutil.copytree(lock_dir_for(loaded), delivery / "locks")
    build_dir = staging / "build"
    for name in UNDELIVERED_PAYLOAD_DIRS:
        shutil.rmtree(build_dir / "payload" / name, ignore_errors=True)
    shutil.copytree(build_dir, delivery / "build")
    shutil.copy2(staging / "build.log", delivery / "build.log")
    shutil.copy2(staging / updates.INDEX_FILE, delivery / updates.INDEX_FILE)
    return artifacts


def keep_private(delivery: Path, artifacts: list[Path]) -> None:
    """A delivery whose disk carries the client's TLS key: only its owner may open the folder
    or read the disk images."""
    delivery.chmod(0o700)
    for artifact in artifacts:
        artifact.chmod(0o600)


def security_index_summary(path: Path) -> dict | None:
    """The security suite and date the image was upgraded against, for the manifest."""
    index = json.loads(path.read_text())
    if index is None:
        return None
    return {"suite": index["suite"], "date": index["date"], "packages": len(index["packages"])}


def write_delivered_profile(loaded: LoadedProfile, delivery: Path) -> Path:
    """The effective profile (everything it extends merged in) with its sample notebooks
    beside it, so that the delivery validates on its own. The client's TLS key stays out."""
    data = loaded.profile.model_dump(mode="json", exclude={"extends"})
    if data["jupyter"].get("tls"):
        data["jupyter"]["tls"] = None
    notebooks = []
    for source in map(Path, loaded.profile.notebooks):
        (delivery / "notebooks").mkdir(exist_ok=True)
        shutil.copy2(source, delivery / "notebooks" / source.name)
        notebooks.append(f"notebooks/{source.name}")
    data["notebooks"] = notebooks
    for env in data["environments"]:
        env["channels"] = [loaded.resolve_channel(c) for c in env["channels"]]
        env.pop("environment_file")  # already merged in
    header = (
        f"# The effective profile of {loaded.name}: {loaded.path.name} with everything it "
        "extends merged in.\n# factory validate reads it; the TLS key of a client-supplied "
        "certificate is never copied here.\n"
    )
    path = delivery / "profile.yaml"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=1 << 16))
    return path


def keep_failure_logs(staging: Path, outputs: Path, name: str) -> Path | None:
    """Keep the logs of a failed build (never its artifacts) in outputs/logs/."""
    logs = [staging / "build.log", staging / "console.log"]
    logs = [path for path in logs if path.exists()]
    if not logs:
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = outputs / "logs" / f"{name}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in logs:
        shutil.copy2(path, folder / path.name)
    return folder


def publish(staging: Path, final: Path) -> None:
    """Move the finished delivery into place; a replaced one is removed only afterwards."""
    replace_folder(staging / "delivery", final)


def replace_folder(new: Path, final: Path) -> None:
    """Put `new` at `final` by renames on one file system: `final` is the old folder or the
    new one, never a half-written one. A replaced folder is removed only afterwards."""
    replaced = None
    if final.exists():
        replaced = final.with_name(f".replaced-{final.name}-{os.getpid()}")
        final.rename(replaced)
    new.rename(final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def render_target(outputs: Path, loaded: LoadedProfile, into: Path | None = None) -> Path:
    """Where `factory render` writes: outputs/renders/<name>/ or --into, never the delivery."""
    outputs = outputs.resolve()
    target = (into or outputs / "renders" / loaded.name).resolve()
    delivery = delivery_dir(outputs, loaded)
    if target == delivery or delivery in target.parents:
        raise FactoryError(
            f"--into {target} is inside the delivery folder {delivery}; render somewhere else "
            f"(the default is {outputs / 'renders' / loaded.name})"
        )
    if target.exists() and not (
        target.is_dir() and (not any(target.iterdir()) or (target / "image.pkr.hcl").is_file())
    ):
        raise FactoryError(
            f"--into {target} holds something other than a factory render; name a new or "
            "empty folder"
        )
    return target


def render_for_review(loaded: LoadedProfile, outputs: Path, into: Path | None = None) -> Path:
    """`factory render`: the build folder a build would use, checked by `packer validate`,
    for review. It holds the build lock, replaces its target in one rename and leaves the
    client's TLS files out, as the delivery's copy of the build folder does."""
    target = render_target(outputs, loaded, into)
    with build_lock(outputs.resolve(), loaded.name):
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".render-{loaded.name}-", dir=target.parent))
        try:
            base_image = loaded.profile.base
            with ephemeral_keypair("factory-render") as key:
                inputs = BuildInputs(
                    base_image=base_image if isinstance(base_image, str) else base_image.url,
                    base_image_checksum="none",
                    accelerator="tcg",
                    output_directory=str(target / "packer-output"),
                    console_log=str(target / "console.log"),
                    build_key=key,
                    packer_version=host.packer_version() or (1, 6, 6),
                )
                build_dir = render_build_dir(loaded, inputs, scratch / "build")
            for name in UNDELIVERED_PAYLOAD_DIRS:
                shutil.rmtree(build_dir / "payload" / name, ignore_errors=True)
            replace_folder(build_dir, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def reexport_ova(delivery: Path, digest: str, progress: Progress) -> Path:
    """Write the delivery's OVA again from its qcow2 (e.g. with another manifest digest).
    The old OVA is replaced only when the new one is complete."""
    from factory.profile import load_profile

    delivery = delivery.resolve()
    loaded = load_profile(delivery / "profile.yaml")
    qcow2 = delivery / f"{loaded.name}.qcow2"
    if not qcow2.is_file():
        raise FactoryError(f"{delivery}: no {qcow2.name}; run `factory build` first")
    with build_lock(delivery.parent, loaded.name):
        progress.set_stage("export")
        ova = export.export_ova(
            qcow2, virtual_hardware(loaded), delivery, digest=digest, log=progress.log
        )
        export.write_checksums(delivery, [ova, qcow2])
        manifest_path = delivery / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        for artifact in manifest["artifacts"]:
            path = delivery / artifact["name"]
            artifact["sha256"], artifact["size"] = sha256_file(path), path.stat().st_size
        tmp = manifest_path.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(manifest_path)
    return ova
