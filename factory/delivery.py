"""The delivery folder, outputs/<name>/, as one value: the names of its parts, its lock, how it
is filled from a build's staging folder, published, recorded in manifest.json and re-exported.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from factory import __version__, boxes, export, signing, updates
from factory.checksums import digests_of, relative_name, write_checksums
from factory.errors import FactoryError
from factory.files import file_lock, replace_path, write_text_atomically
from factory.handover import write_handover
from factory.profile import LoadedProfile, load_profile
from factory.progress import Progress
from factory.resolve import lock_dir_for
from factory.sbom import SBOM_FILE

# Payload parts the host-side install uses and the build VM never needs.
HOST_ONLY_PAYLOAD_DIRS = ["channel", "wheels", "installer", "conda-installer"]
# Payload parts left out of the delivery's copy of the build folder: large, or secret.
UNDELIVERED_PAYLOAD_DIRS = [*HOST_ONLY_PAYLOAD_DIRS, "tls"]


@contextmanager
def build_lock(outputs: Path, name: str) -> Iterator[None]:
    """One build (or export) per delivery name at a time; a second one refuses at once."""
    outputs.mkdir(parents=True, exist_ok=True)
    lock_path = outputs / f".{name}.lock"
    with file_lock(
        lock_path,
        wait=False,
        busy=f"another build of {name} is running (lock {lock_path}); wait for it to finish",
    ):
        yield


class _Part:
    """A file or folder of the delivery, named once: `{name}` is the delivery's name."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def __get__(self, delivery: Delivery, owner: type | None = None) -> Path:
        return delivery.path / self.pattern.format(name=delivery.name)


@dataclass(frozen=True)
class Delivery:
    """outputs/<name>/ and the names of everything in it."""

    path: Path
    name: str

    ova = _Part("{name}.ova")
    qcow2 = _Part("{name}.qcow2")
    profile = _Part("profile.yaml")
    manifest = _Part("manifest.json")
    locks = _Part("locks")
    build_dir = _Part("build")
    build_log = _Part("build.log")
    security_index = _Part(updates.INDEX_FILE)
    sbom = _Part(SBOM_FILE)

    @classmethod
    def of(cls, outputs: Path, loaded: LoadedProfile) -> Delivery:
        return cls(Path(outputs) / loaded.name, loaded.name)

    @property
    def artifacts(self) -> list[Path]:
        """What SHA256SUMS and manifest.json list: the disk images, and the container images
        when the delivery has them (`--format oci`)."""
        images = [self.path / f"{self.name}.{kind}.tar" for kind in ("oci", "docker")]
        return [self.ova, self.qcow2, *(image for image in images if image.is_file())]

    @contextmanager
    def lock(self) -> Iterator[None]:
        with build_lock(self.path.parent, self.name):
            yield


@dataclass(frozen=True)
class OpenDelivery:
    """A published delivery with its effective profile loaded (once)."""

    delivery: Delivery
    loaded: LoadedProfile


def open_delivery(path: Path) -> OpenDelivery:
    """A published delivery folder, checked to hold its profile and its qcow2."""
    path = Path(path).resolve()
    if not (path / "profile.yaml").is_file():
        raise FactoryError(f"{path} is not a delivery folder (no profile.yaml); build it first")
    loaded = load_profile(path / "profile.yaml")
    delivery = Delivery(path, loaded.name)
    if not delivery.qcow2.is_file():
        raise FactoryError(f"{path}: no {delivery.qcow2.name}; run `factory build` first")
    return OpenDelivery(delivery, loaded)


# --- filling a staging folder ---------------------------------------------------------------


def fill(
    loaded: LoadedProfile, staging: Path, built: Path, ova_digest: str, progress: Progress
) -> tuple[Delivery, dict[Path, str]]:
    """Turn the built image (the top of its layer chain, read through its backing files) into
    the delivery's parts, in staging/delivery; returns it with its artifacts' sha256 (for the
    manifest, so they are hashed once)."""
    delivery = Delivery(staging / "delivery", loaded.name)
    delivery.path.mkdir()
    signer = signing.profile_signer(loaded)
    hardware = export.virtual_hardware(
        loaded, signing.vendor(loaded, signer), full_version(_git_state())
    )
    # Both conversions compress on one core each: run them side by side.
    progress.update("writing the OVA and the compressed qcow2")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        compressing = pool.submit(
            export.export_qcow2, built, delivery.path, loaded.name, progress.log
        )
        export.export_ova(
            built, hardware, delivery.path, digest=ova_digest, log=progress.log, signer=signer
        )
        compressing.result()
    digests = digests_of(delivery.artifacts)
    write_signed_checksums(delivery, digests, signer)
    write_delivered_profile(loaded, delivery)
    write_handover(loaded, delivery.path)
    shutil.copytree(lock_dir_for(loaded), delivery.locks)
    build_dir = staging / "build"
    for name in UNDELIVERED_PAYLOAD_DIRS:
        shutil.rmtree(build_dir / "payload" / name, ignore_errors=True)
    shutil.copytree(build_dir, delivery.build_dir)
    shutil.copy2(staging / "build.log", delivery.build_log)
    shutil.copy2(staging / updates.INDEX_FILE, delivery.security_index)
    shutil.copy2(staging / SBOM_FILE, delivery.sbom)
    return delivery, digests


def keep_private(delivery: Delivery) -> None:
    """A delivery whose disk carries the client's TLS key: only its owner may open the folder
    or read the disk images."""
    delivery.path.chmod(0o700)
    for artifact in delivery.artifacts:
        artifact.chmod(0o600)


def security_index_summary(path: Path) -> dict | None:
    """The security suite and date the image was upgraded against, for the manifest."""
    index = json.loads(path.read_text())
    if index is None:
        return None
    return {"suite": index["suite"], "date": index["date"], "packages": len(index["packages"])}


def write_delivered_profile(loaded: LoadedProfile, delivery: Delivery) -> Path:
    """The effective profile (everything it extends merged in) with its sample notebooks
    beside it, so that the delivery validates on its own. The client's TLS key stays out."""
    data = loaded.profile.model_dump(mode="json", exclude={"extends"})
    if data["jupyter"].get("tls"):
        data["jupyter"]["tls"] = None
    notebooks = []
    for source in map(Path, loaded.profile.notebooks):
        (delivery.path / "notebooks").mkdir(exist_ok=True)
        shutil.copy2(source, delivery.path / "notebooks" / source.name)
        notebooks.append(f"notebooks/{source.name}")
    data["notebooks"] = notebooks
    for service in data["services"]:
        folder = delivery.path / "services" / service["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for source in map(Path, service["files"]):
            shutil.copy2(source, folder / source.name)
        service["files"] = [f"services/{service['name']}/{Path(f).name}" for f in service["files"]]
    for env in data["environments"]:
        env["channels"] = [loaded.resolve_channel(c) for c in env["channels"]]
        env.pop("environment_file")  # already merged in
    header = (
        f"# The effective profile of {loaded.name}: {loaded.path.name} with everything it "
        "extends merged in.\n# factory validate reads it; the TLS key of a client-supplied "
        "certificate is never copied here.\n"
    )
    delivery.profile.write_text(header + yaml.safe_dump(data, sort_keys=False, width=1 << 16))
    return delivery.profile


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


def publish(staged: Delivery, final: Delivery) -> None:
    """Move the finished delivery into place; a replaced one is removed only afterwards."""
    replace_path(staged.path, final.path)


# --- manifest.json --------------------------------------------------------------------------


def _git_state() -> dict | None:
    """Revision and dirty flag of the checkout holding the factory package, or None."""
    package_dir = str(Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", "-C", package_dir, *args], capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            return None
        return result.stdout if result.returncode == 0 else None

    revision = git("rev-parse", "--verify", "HEAD")
    status = git("status", "--porcelain")
    if revision is None or status is None:
        return None
    return {"revision": revision.strip(), "dirty": bool(status.strip())}


def full_version(git: dict | None) -> str:
    """The OVF FullVersion of an image: the factory revision that built it (as manifest.json
    records it), or the factory release where no checkout is at hand."""
    if not git:
        return f"factory {__version__}"
    return git["revision"] + ("-dirty" if git["dirty"] else "")


def _utc_iso(moment: datetime) -> str:
    # A naive datetime is taken as local time, which is what datetime.now() returns.
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _artifact_records(
    out_dir: Path, artifacts: list[Path], digests: Mapping[Path, str] | None = None
) -> list[dict]:
    digests = digests or digests_of(artifacts)
    return [
        {
            "name": relative_name(out_dir, path),
            "sha256": digests[path],
            "size": path.stat().st_size,
        }
        for path in map(Path, artifacts)
    ]


def write_build_manifest(
    out_dir: Path,
    *,
    profile_sha256: str,
    artifacts: list[Path],
    tool_versions: dict[str, str],
    started: datetime,
    finished: datetime,
    stages: list[dict] | None = None,
    extra: dict | None = None,
    digests: Mapping[Path, str] | None = None,
) -> Path:
    """Write out_dir/manifest.json, the sidecar record of what was built, from what, how,
    and how long each stage of the pipeline took."""
    out_dir = Path(out_dir)
    duration = (finished.astimezone(UTC) - started.astimezone(UTC)).total_seconds()
    if duration < 0:
        raise FactoryError(f"build finished ({finished}) before it started ({started})")
    record = {
        "factory_version": __version__,
        "profile_sha256": profile_sha256,
        "artifacts": _artifact_records(out_dir, artifacts, digests),
        "git": _git_state(),
        "tool_versions": dict(tool_versions),
        "build": {
            "started": _utc_iso(started),
            "finished": _utc_iso(finished),
            "duration_s": round(duration, 3),
        },
        "stages": list(stages or []),
        "extra": dict(extra or {}),
    }
    return write_text_atomically(
        out_dir / "manifest.json", json.dumps(record, indent=2, sort_keys=False) + "\n"
    )


def write_signed_checksums(
    delivery: Delivery, digests: Mapping[Path, str], signer: signing.Signer | None
) -> None:
    """SHA256SUMS of the artifacts, and with a signer its signature and certificate."""
    write_checksums(delivery.path, delivery.artifacts, digests)
    if signer is not None:
        signing.sign_checksums(delivery.path, signer)


def record_artifacts(delivery: Delivery, signer: signing.Signer | None = None) -> None:
    """After a re-export: SHA256SUMS (signed again) and manifest.json list the artifacts as
    they are now."""
    digests = digests_of(delivery.artifacts)
    write_signed_checksums(delivery, digests, signer)
    manifest = json.loads(delivery.manifest.read_text())
    manifest["artifacts"] = _artifact_records(delivery.path, delivery.artifacts, digests)
    write_text_atomically(delivery.manifest, json.dumps(manifest, indent=2) + "\n")


# --- re-export ------------------------------------------------------------------------------


def reexport(
    path: Path,
    *,
    ova: bool,
    ova_digest: str | None = None,
    box_formats: list[str],
    box_root: Path | None = None,
    box_url: str | None = None,
    progress: Progress,
) -> list[Path]:
    """Write a delivery's OVA (with `ova`, signed again when its profile signs) and Vagrant
    boxes again from its qcow2: the profile is read once and the delivery locked once. An old
    OVA is replaced only when the new one is complete."""
    boxes.check_box_url(box_url)
    opened = open_delivery(path)
    delivery, loaded = opened.delivery, opened.loaded
    signer = signing.profile_signer(loaded) if ova else None
    written: list[Path] = []
    with delivery.lock():
        if ova:
            progress.set_stage("export")
            # The image is the one the recorded revision built, whichever factory re-exports it.
            built_by = json.loads(delivery.manifest.read_text()).get("git")
            hardware = export.virtual_hardware(
                loaded, signing.vendor(loaded, signer), full_version(built_by)
            )
            written.append(
                export.export_ova(
                    delivery.qcow2,
                    hardware,
                    delivery.path,
                    digest=ova_digest,
                    log=progress.log,
                    signer=signer,
                )
            )
            record_artifacts(delivery, signer)
        if box_formats:
            progress.set_stage("boxes")
            written += _write_boxes(opened, box_formats, box_root, box_url, progress.log)
    return written


def _write_boxes(
    opened: OpenDelivery,
    formats: list[str],
    box_root: Path | None,
    box_url: str | None,
    log: Callable[[str], None],
) -> list[Path]:
    """The delivery's boxes in <box_root>/<client>_<project>/ (default: boxes/ beside the
    delivery), listed in that folder's catalog."""
    spec = boxes.box_spec(opened.loaded)
    box_dir = (Path(box_root) if box_root else opened.delivery.path.parent / "boxes") / spec.slug
    return boxes.export_boxes(
        opened.delivery.qcow2,
        spec,
        formats,
        box_dir,
        box_url,
        opened.loaded.profile.description,
        log=log,
    )
