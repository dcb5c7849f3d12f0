"""The chain, in the order it runs:

    lock -> installer -> base -> render -> bundle -> layers -> export -> publish

The layers (factory.chain) are system, conda, one per environment and client; each is taken
from the layer store when its key is there, otherwise made and stored.

Every stage runs through `Steps.step`, which names it on the progress line, times it and
records it; manifest.json keeps the record (`stages`). All work happens in a private staging
folder next to outputs/<name>/; the delivery appears, by a rename, only when everything
succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from factory import assemble, base, chain, cpu, delivery, events, export, gpu, kvm, signing, tools
from factory.build import PACKER_TIME_LIMIT_MINUTES
from factory.bundle import build_payload, fetch_conda_installer
from factory.delivery import Delivery, build_lock
from factory.dossier import write_dossier
from factory.errors import FactoryError, InfrastructureError
from factory.files import replace_path, staging_dir
from factory.host import VMSize
from factory.keys import KeyPair, ephemeral_keypair
from factory.layers import LayerStatus, LayerStore, cache_max_bytes, chain_keys, explain
from factory.profile import LoadedProfile
from factory.progress import Progress, plain_log
from factory.render import BuildInputs, build_vm_size, render_build_dir
from factory.resolve import lock_profile
from factory.tables import human_bytes

# What the Debian base image holds before any environment is installed.
BASE_CONTENT_GIB = 1.5


@dataclass(frozen=True)
class BuildOptions:
    outputs: Path
    accelerator: str = "auto"
    force: bool = False
    ova_digest: str | None = None  # None: sha1, or sha256 when the profile signs
    time_limit_minutes: float = PACKER_TIME_LIMIT_MINUTES
    locked: bool = False


@dataclass
class Steps:
    """Runs the stages one after another: each is shown, timed and recorded."""

    progress: Progress
    profile: str = ""  # the delivery name, in each event
    records: list[dict] = field(default_factory=list)

    @contextmanager
    def step(self, name: str, log: str | None = None, cache: str | None = None) -> Iterator[None]:
        """One stage; `cache` is hit or miss for a layer (in its events)."""
        self.progress.set_stage(name)
        events.emit("stage-start", self.profile, stage=name, cache=cache)
        started = time.monotonic()
        try:
            yield
        except BaseException as error:
            status = "failed" if isinstance(error, Exception) else "interrupted"
            events.emit(
                "stage-end", self.profile, stage=name, cache=cache, status=status,
                seconds=round(time.monotonic() - started, 1), error=str(error) or None,
            )  # fmt: skip
            raise
        seconds = round(time.monotonic() - started, 1)
        self.progress.log(f"{name} done in {seconds:g} s")
        events.emit(
            "stage-end", self.profile, stage=name, cache=cache, status="ok", seconds=seconds
        )
        self.records.append({"name": name, "seconds": seconds, "log": log})


def check_free_disk(outputs: Path, loaded: LoadedProfile, payload_gib: float = 0.0) -> None:
    """Refuse early when the build could fill the disk. The disk images are sparse: at its
    peak the build holds the assembled image and packer's copy of it, each the base plus the
    installed environments (about three times their packages, with the offline copies), never
    more than the profile's disk; the export needs room beside them."""
    content = BASE_CONTENT_GIB + 3 * payload_gib
    needed_gib = round(min(loaded.profile.resources.disk, 2 * content) + 2, 1)
    free_gib = shutil.disk_usage(outputs).free / 2**30
    if free_gib < needed_gib:
        raise InfrastructureError(
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


def base_image_for(loaded: LoadedProfile, log: Callable[[str], None], build: bool = True) -> Path:
    """The profile's base image, made or fetched when missing (with build=False: only where
    it is, or would be)."""
    spec = loaded.profile.base
    if isinstance(spec, str):
        return base.debian_base_image(
            spec, log=log, extra_packages=gpu_base_packages(loaded), build=build
        )
    return base.cloud_base_image(spec.url, spec.sha256, log=log, build=build)


def base_record(loaded: LoadedProfile, base_image: Path) -> dict:
    """The base image for the build record: its file, its sha256, and a cloud image's URL."""
    spec = loaded.profile.base
    if not isinstance(spec, str):
        return {"image": base_image.name, "url": spec.url, "sha256": spec.sha256}
    record = base_image.with_suffix(".json")
    sha256 = json.loads(record.read_text()).get("sha256") if record.is_file() else None
    return {"image": base_image.name, "sha256": sha256}


def conda_installer_for(loaded: LoadedProfile, log: Callable[[str], None]) -> Path | None:
    """The profile's Miniconda or Miniforge installer, fetched and checked; None for rattler."""
    source = loaded.profile.conda.installer_source()
    return fetch_conda_installer(*source, log=log) if source else None


def packer_version() -> tuple[int, int, int]:
    """The host's packer release; the template is rendered for Debian 12's 1.6.6 when packer
    cannot say (render fails later with a clear message if packer is missing)."""
    return tools.packer_version() or (1, 6, 6)


def tool_versions() -> dict[str, str]:
    versions = {}
    packer = tools.packer_version()
    versions["packer"] = ".".join(map(str, packer)) if packer else "unknown"
    for tool in ("qemu-system-x86_64", "qemu-img"):
        result = subprocess.run([tool, "--version"], capture_output=True, text=True)
        versions[tool] = result.stdout.splitlines()[0] if result.returncode == 0 else "unknown"
    versions["py-rattler"] = metadata.version("py-rattler")
    return versions


def build_image(loaded: LoadedProfile, options: BuildOptions) -> Path:
    """Run the whole chain for one profile and return the published delivery folder."""
    started = datetime.now(UTC)
    outputs = options.outputs.resolve()
    final = Delivery.of(outputs, loaded)
    with build_lock(outputs, loaded.name):
        if final.path.exists() and not options.force:
            raise FactoryError(
                f"{final.path} already holds a delivery of {loaded.name}; bump `version` in "
                f"{loaded.path.name} or pass --force to replace it"
            )
        check_free_disk(outputs, loaded)
        # A missing or unusable signing key, or a digest it cannot sign, stops the build here.
        export.ova_flavor(options.ova_digest, signed=signing.profile_signer(loaded) is not None)
        assemble.check_host()
        accelerator = kvm.choose_accelerator(options.accelerator)
        vm = build_vm_size(loaded)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{loaded.name}-", dir=outputs))
        try:
            with Progress() as progress:
                steps = Steps(progress, loaded.name)
                _preflight(loaded, accelerator, vm, progress)
                built = _run_stages(loaded, options, accelerator, vm, staging, steps)
            staged = built.delivery
            delivery.write_build_manifest(
                staged.path,
                profile_sha256=loaded.sha256,
                artifacts=staged.artifacts,
                digests=built.digests,
                tool_versions=tool_versions(),
                started=started,
                finished=datetime.now(UTC),
                stages=steps.records,
                extra={
                    "name": loaded.name,
                    "accelerator": accelerator,
                    "security_index": delivery.security_index_summary(staged.security_index),
                    "guest_disk": built.guest_disk,
                    "base": built.base,
                    "layers": built.layers,
                },
            )
            write_dossier(staged.path)
            if loaded.profile.jupyter.tls:
                delivery.keep_private(staged)
            delivery.publish(staged, final)
        except BaseException:
            kept = delivery.keep_failure_logs(staging, outputs, loaded.name)
            if kept:
                print(f"build logs kept in {kept}", file=sys.stderr)
            raise
        finally:
            base.remove_unless_mounted(staging, log=lambda line: print(line, file=sys.stderr))
    return final.path


def _preflight(loaded: LoadedProfile, accelerator: str, vm: VMSize, progress: Progress) -> None:
    progress.set_stage("pre-flight")
    progress.update(f"accelerator {accelerator}")
    resources = loaded.profile.resources
    progress.log(
        f"build VM: {vm.cpus} CPUs, {vm.memory_mib} MiB, CPU model "
        f"{cpu.build_cpu_model(accelerator)} (the delivered VM: {resources.cpus} "
        f"CPUs, {resources.memory} MiB)"
    )


@dataclass(frozen=True)
class _Built:
    delivery: Delivery  # in the staging folder, not yet published
    digests: dict[Path, str]  # each artifact's sha256
    guest_disk: dict | None  # the image's root file system: bytes used, and size
    base: dict  # the base image: its name, and where it came from with its sha256
    layers: list[dict]  # each layer's name and key, root first: what `verify --profile` reads


def _run_stages(
    loaded: LoadedProfile,
    options: BuildOptions,
    accelerator: str,
    vm: VMSize,
    staging: Path,
    steps: Steps,
) -> _Built:
    progress, step = steps.progress, steps.step
    cache_max = cache_max_bytes()  # a bad FACTORY_CACHE_MAX fails before anything is built
    with step("lock"):
        locks = lock_profile(loaded, log=progress.log, locked=options.locked)
    with step("installer"):
        # Fetched (and checked) before anything boots.
        conda_installer = conda_installer_for(loaded, progress.log)
    with step("base"):
        base_image = base_image_for(loaded, progress.log)
    store = LayerStore()
    with ephemeral_keypair(f"factory-build@{loaded.name}") as key:
        system_gib = chain.system_disk_gib(loaded, base_image)
        inputs = dataclasses.replace(
            _build_inputs(staging, accelerator, key, vm), disk_gib=system_gib
        )
        with step("render"):
            build_dir = render_build_dir(loaded, inputs, staging / "build", validate=False)
        with step("bundle"):
            payload = build_dir / "payload"
            build_payload(locks, payload, log=progress.log, conda_installer=conda_installer)
            check_free_disk(staging.parent, loaded, payload_size_gib(payload))
        layers = chain.plan(loaded, base_image, build_dir, system_gib)
        stored = {}
        for status in explain(layers[1:], store):
            stored[status.layer.name] = "hit" if status.hit else "miss"
            progress.log(f"layer {status.layer.name}: {stored[status.layer.name]}"
                         f"{'' if status.hit else ' (' + status.why + ')'}")  # fmt: skip
        job = chain.LayerBuild(
            loaded, build_dir, staging, key, progress, options.time_limit_minutes, store
        )
        in_use = contextlib.ExitStack()
        for layer in layers:
            store.hold(layer, in_use)
        with in_use:
            image = base_image
            for layer in layers[1:]:
                with step(layer.name, log="build.log", cache=stored[layer.name]):
                    image = chain.ensure(layer, image, job)
            chain.write_security_index(layers, store, staging)
            chain.write_sbom(layers, store, staging, loaded)
            (staging / "build.log").touch()
            with step("export"):
                staged, digests = delivery.fill(
                    loaded, staging, image, options.ova_digest, progress
                )
            guest = chain.guest_disk(layers, store, staging)
            _report_sizes(staged, guest, progress)
            removed = store.prune(cache_max, keep=frozenset(layer.key for layer in layers))
    if removed:
        freed = human_bytes(sum(record["bytes"] for record in removed))
        progress.log(f"cache: {len(removed)} least recently used layers removed ({freed})")
    return _Built(staged, digests, guest, base_record(loaded, base_image), chain_keys(layers))


def _report_sizes(staged: Delivery, guest: dict | None, progress: Progress) -> None:
    """Each artifact's size next to the data in use inside the guest."""
    used = f"{human_bytes(guest['used_bytes'])} in use" if guest else "in use unknown"
    for artifact in staged.artifacts:
        size = human_bytes(artifact.stat().st_size)
        progress.log(f"{artifact.name}: {size} ({used} inside the guest)")


def _build_inputs(staging: Path, accelerator: str, key: KeyPair, vm: VMSize | None) -> BuildInputs:
    return BuildInputs(
        # The system layer's starting point, made by chain._make_system from the base.
        base_image=str(staging / "system.qcow2"),
        base_image_checksum="none",
        accelerator=accelerator,
        output_directory=str(staging / "packer-output"),
        console_log=str(staging / "console.log"),
        build_key=key,
        packer_version=packer_version(),
        vm=vm,
    )


def _quiet(line: str) -> None:
    """A log that drops its lines (--explain prints only its table)."""


def explain_build(loaded: LoadedProfile, options: BuildOptions) -> list[LayerStatus]:
    """Each layer of the build, stored or not and why, without building anything (the lock
    is solved when it is stale, and the packages are fetched to key the environments)."""
    locks = lock_profile(loaded, log=_quiet, locked=options.locked)
    base_image = base_image_for(loaded, _quiet, build=False)
    system_gib = chain.system_disk_gib(loaded, base_image)
    with staging_dir(options.outputs.resolve()) as scratch:
        with ephemeral_keypair("factory-explain") as key:
            inputs = dataclasses.replace(
                _build_inputs(scratch, "tcg", key, None), disk_gib=system_gib
            )
            build_dir = render_build_dir(loaded, inputs, scratch / "build", validate=False)
        payload = build_dir / "payload"
        build_payload(
            locks, payload, log=_quiet, conda_installer=conda_installer_for(loaded, _quiet)
        )
        layers = chain.plan(loaded, base_image, build_dir, system_gib)
        return explain(layers, LayerStore())


def render_target(outputs: Path, loaded: LoadedProfile, into: Path | None = None) -> Path:
    """Where `factory render` writes: outputs/renders/<name>/ or --into, never the delivery."""
    outputs = outputs.resolve()
    target = (into or outputs / "renders" / loaded.name).resolve()
    final = Delivery.of(outputs, loaded).path
    if target == final or final in target.parents:
        raise FactoryError(
            f"--into {target} is inside the delivery folder {final}; render somewhere else "
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


def render_for_review(
    loaded: LoadedProfile, outputs: Path, into: Path | None = None, builder: str = "qemu"
) -> Path:
    """`factory render`: the chain up to the render stage, for review. The build folder a
    build would use, checked by `packer validate`, replaced in one rename, without the
    client's TLS files (as in the delivery's copy of the build folder).

    For a client's cluster (a remote builder) the folder is the whole build instead: every
    stage runs in the VM Packer clones there, and the payload carries the locked packages and
    the conda installer, so `packer build` needs only the connection in the environment
    (docs/remote-builders.md)."""
    target = render_target(outputs, loaded, into)
    remote = builder != "qemu"
    with build_lock(outputs.resolve(), loaded.name), staging_dir(target.parent) as scratch:
        base_image = loaded.profile.base
        locks = lock_profile(loaded, log=plain_log) if remote else None
        with ephemeral_keypair("factory-render") as key:
            inputs = BuildInputs(
                base_image=base_image if isinstance(base_image, str) else base_image.url,
                base_image_checksum="none",
                accelerator="tcg",
                output_directory=str(target / "packer-output"),
                console_log=str(target / "console.log"),
                build_key=key,
                packer_version=packer_version(),
                builder=builder,
            )
            build_dir = render_build_dir(loaded, inputs, scratch / "build")
        if locks is not None:  # the VM there installs everything itself
            installer = conda_installer_for(loaded, plain_log)
            build_payload(locks, build_dir / "payload", log=plain_log, conda_installer=installer)
        else:
            for name in delivery.UNDELIVERED_PAYLOAD_DIRS:
                shutil.rmtree(build_dir / "payload" / name, ignore_errors=True)
        replace_path(build_dir, target)
    return target
