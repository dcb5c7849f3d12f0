"""A build's layers, in order, and how each is made:

    base -> system -> conda -> env <name> (one per environment) -> client

- base: the Debian or cloud base image (factory.base), already cached under its own key.
- system: patched from the security suite on the host, then booted by Packer for what needs a
  running system (sshd, firewall, audit, services, first-boot unit) and sealed. It keeps the
  base's disk and is keyed by the settings its stages read: never a secret, never the
  delivery's name, so profiles on one base and one preset share it.
- conda, env <name>: the installer (which grows the disk to the profile's), then each locked
  environment, installed on the host in a chroot of the image at native speed; an
  environment's key is its packages and their hashes.
- client: the kernels, notebooks, the client's TLS files, the admin user, the delivery's
  settings and name, the offline channel; then the host's leftovers are removed and free
  space trimmed.

Every layer's key chains its inputs to its parent's (factory.layers), so a build reuses the
longest stored prefix and makes only what follows; a build stopped in layer k starts again
from layer k.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from factory import assemble, cache, sbom, updates
from factory.build import run_packer
from factory.delivery import HOST_ONLY_PAYLOAD_DIRS
from factory.export import qemu_img_info
from factory.keys import KeyPair
from factory.layers import Layer, LayerStore, digest_files
from factory.processes import LoggedRunner
from factory.profile import LoadedProfile
from factory.progress import Progress
from factory.render import (
    CONDA_SCRIPT,
    GUEST_PAYLOAD_FILES,
    GUEST_SCRIPTS,
    HOST_SCRIPTS,
    packer_validate,
)
from factory.resolve import image_environments

# The system layer's disk: every profile on one base and one preset shares that layer, whatever
# its disk; the conda layer grows the disk to the profile's size.
SYSTEM_DISK_GIB = 4
_SETTING = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)")
# The host stages after the conda installer's, run in order when the client layer is made.
_CLIENT_SCRIPTS = tuple(name for name in HOST_SCRIPTS if name != CONDA_SCRIPT)


def _fingerprint(module: object) -> str:
    """The source of the code that makes a layer: a change to it makes new layers."""
    return cache.sha256_file(Path(module.__file__))


def system_disk_gib(loaded: LoadedProfile, base_image: Path) -> int:
    """The base's size, at least SYSTEM_DISK_GIB, at most the profile's disk."""
    if not base_image.is_file():  # --explain before the base is built
        return min(loaded.profile.resources.disk, SYSTEM_DISK_GIB)
    base_gib = -(-qemu_img_info(base_image)["virtual-size"] // 2**30)
    return min(loaded.profile.resources.disk, max(SYSTEM_DISK_GIB, base_gib))


def _guest_settings(build_dir: Path, scripts: list[Path]) -> dict[str, str]:
    """The settings the guest stages read, and only those: the delivery's name or its
    environments do not change what the system layer holds."""
    referenced = set()
    for script in scripts:
        referenced |= set(_SETTING.findall(script.read_text()))
    settings = {}
    for line in (build_dir / "payload" / "settings.sh").read_text().splitlines():
        name, _, value = line.partition("=")
        if name in referenced:
            settings[name] = value
    return settings


def _lock_identity(env_dir: Path) -> str:
    """What an environment's layer installs: each conda package file with its md5 and each pip
    requirement with its hashes; not the URLs they were fetched from, nor the lock's header."""
    conda = [
        line.rsplit("/", 1)[-1]
        for line in (env_dir / "explicit.txt").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "@"))
    ]
    pip_file = env_dir / "pip.txt"
    pip = [
        line.strip()
        for line in (pip_file.read_text().splitlines() if pip_file.is_file() else [])
        if line.strip() and not line.startswith("#")
    ]
    return hashlib.sha256(json.dumps([conda, pip]).encode()).hexdigest()


def system_inputs(loaded: LoadedProfile, build_dir: Path, system_gib: int) -> dict[str, str]:
    """What the system layer is keyed by: the template, the guest stages and the settings and
    payload files they read; not the delivery's name, its environments or its client layer."""
    payload, provisioners = build_dir / "payload", build_dir / "provisioners"
    guest = [provisioners / n for n in GUEST_SCRIPTS if (provisioners / n).is_file()]
    guest.append(payload / "seal.sh")
    inputs = {
        "template": digest_files([build_dir / "image.pkr.hcl"]),
        "scripts": digest_files(guest),
        "settings": json.dumps(_guest_settings(build_dir, guest), sort_keys=True),
        # settings.sh is keyed above by the settings the stages read, not by its whole text.
        "payload": digest_files(
            [p for n in GUEST_PAYLOAD_FILES if n != "settings.sh" and (p := payload / n).is_file()]
        ),
        "disk_gib": str(system_gib),
        "host_code": _fingerprint(assemble),
    }
    if not isinstance(loaded.profile.base, str):
        # A cloud image is patched when the system layer is made: once a day at most.
        inputs["security_day"] = datetime.now(UTC).date().isoformat()
    return inputs


def plan(loaded: LoadedProfile, base_image: Path, build_dir: Path, system_gib: int) -> list[Layer]:
    """The chain of layers for a rendered and bundled build folder, root first; `system_gib`
    is system_disk_gib(), the disk the build folder was rendered for."""
    payload, provisioners = build_dir / "payload", build_dir / "provisioners"
    profile = loaded.profile
    base = Layer("base", {"image": base_image.name}, image=base_image)
    system = Layer("system", system_inputs(loaded, build_dir, system_gib), base)
    host_code = system.inputs["host_code"]

    conda_files = [provisioners / CONDA_SCRIPT, payload / "install_env.py", payload / "factory-env"]
    conda_files += sorted((payload / "installer").glob("*.whl"))
    conda_files += sorted((payload / "conda-installer").glob("*"))
    conda_inputs = {
        "installer": profile.conda.installer,
        "files": digest_files(conda_files),
        "disk_gib": str(profile.resources.disk),
    }
    chain = [base, system, Layer("conda", conda_inputs, system)]
    # Jupyter's own environment changes least: below the client's, a client's lock change
    # leaves it stored.
    envs = sorted(image_environments(loaded), key=lambda env: env.name != "jupyter")
    for env in envs:
        lock = _lock_identity(payload / "envs" / env.name)
        chain.append(Layer(f"env {env.name}", {"lock": lock}, chain[-1]))

    # The payload's own files; its packages are keyed by the locks (envs/), and its
    # SHA256SUMS lists the channel's index, which is rewritten, with a new date, each time.
    bundled = (*HOST_ONLY_PAYLOAD_DIRS, "SHA256SUMS")
    small = [p for p in payload.rglob("*")
             if p.is_file() and p.relative_to(payload).parts[0] not in bundled]  # fmt: skip
    client_inputs = {
        "payload": digest_files(small, root=payload),
        "scripts": digest_files(
            [provisioners / n for n in _CLIENT_SCRIPTS if (provisioners / n).is_file()]
        ),  # fmt: skip
        "offline": str(int(profile.offline)),
        "host_code": host_code,
        "inventory_code": _fingerprint(sbom),
    }
    tls = profile.jupyter.tls is not None
    chain.append(Layer("client", client_inputs, chain[-1], cacheable=not tls))
    return chain


@dataclass
class LayerBuild:
    """What making a layer needs besides the layer: the build folder, a scratch folder, the
    build key and log, and where uncached layers go."""

    loaded: LoadedProfile
    build_dir: Path
    staging: Path
    key: KeyPair
    progress: Progress
    time_limit_minutes: float
    store: LayerStore

    @property
    def log_file(self) -> Path:
        return self.staging / "build.log"

    def runner(self, logf) -> LoggedRunner:
        return LoggedRunner(logf, self.log_file, self.progress.update)


def ensure(layer: Layer, parent: Path | None, job: LayerBuild) -> Path:
    """The layer's image: from the store when it is there, otherwise made now on `parent`
    (the image of the layer below) and stored, unless it holds a secret. Two builds that need
    the same layer make it once: the second waits, then finds it."""
    store, log = job.store, job.progress.log

    def reuse(how: str) -> Path:
        store.touch(layer, job.loaded.name)
        log(f"layer {layer.name}: {how} ({layer.key[:12]})")
        return store.image(layer)

    if store.has(layer):
        return reuse("stored")
    with store.building(layer, log):
        if store.has(layer):
            return reuse("made by another build")
        work = Path(tempfile.mkdtemp(prefix=f".layer-{layer.key[:12]}-", dir=job.staging))
        try:
            image, extra = _MAKERS[layer.name.split()[0]](layer, parent, work, job)
            if not layer.cacheable:
                kept = job.staging / f"{layer.name}.qcow2"
                shutil.move(image, kept)
                (job.staging / f"{layer.name}.json").write_text(json.dumps(extra))
                log(f"layer {layer.name}: made, not stored (it holds the client's TLS key)")
                return kept
            stored = store.publish(layer, image, job.loaded.name, extra)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log(f"layer {layer.name}: made and stored ({layer.key[:12]})")
    return stored


def _record(chain: list[Layer], name: str, store: LayerStore, staging: Path) -> dict:
    """A layer's manifest: from the store, or from staging for a layer never stored."""
    layer = next(layer for layer in chain if layer.name == name)
    if layer.cacheable:
        return store.manifest(layer.key) or {}
    return json.loads((staging / f"{name}.json").read_text())


def security_index(chain: list[Layer], store: LayerStore, staging: Path) -> dict | None:
    """The security index the system layer was patched against, from its manifest."""
    return _record(chain, "system", store, staging).get("security_index")


def guest_disk(chain: list[Layer], store: LayerStore, staging: Path) -> dict | None:
    """The image's root file system when the client layer was made: bytes used, and size."""
    return _record(chain, "client", store, staging).get("guest_disk")


def _make_system(layer: Layer, parent: Path, work: Path, job: LayerBuild) -> tuple[Path, dict]:
    prepared = job.staging / "system.qcow2"  # the pkrvars' base_image
    output = job.staging / "packer-output"
    shutil.rmtree(output, ignore_errors=True)
    prepared.unlink(missing_ok=True)
    with open(job.log_file, "a") as logf:
        run = job.runner(logf)
        run.step("growing the disk and patching it from the security suite (on the host)")
        assemble.new_overlay(run, parent, prepared, int(layer.inputs["disk_gib"]))
        with assemble.mounted(run, prepared, work, grow=True) as mnt:
            index = assemble.upgrade(run, mnt)
        if index is None:
            run.step("the image's apt sources name no security suite: it is not patched")
        else:
            run.step(f"patched against {index.suite} of {index.date}")
    packer_validate(job.build_dir, job.key.private_key_file)
    run_packer(
        job.build_dir, job.key.private_key_file, job.log_file, job.progress,
        job.time_limit_minutes,
    )  # fmt: skip
    built = output / f"{job.loaded.name}.qcow2"
    prepared.unlink()
    return built, {"security_index": index.to_json() if index else None}


def _host_layer(
    steps: Callable[[LoggedRunner, Path], dict | None],
    parent: Path,
    work: Path,
    job: LayerBuild,
    grow_to_gib: int | None = None,
) -> tuple[Path, dict]:
    with open(job.log_file, "a") as logf:
        run = job.runner(logf)
        image = assemble.new_overlay(run, parent, work / "layer.qcow2", grow_to_gib)
        payload = job.build_dir / "payload"
        with assemble.mounted(run, image, work, payload, grow=bool(grow_to_gib)) as mnt:
            extra = steps(run, mnt)
    return image, extra or {}


def _make_conda(layer: Layer, parent: Path, work: Path, job: LayerBuild) -> tuple[Path, dict]:
    script = job.build_dir / "provisioners" / CONDA_SCRIPT

    def steps(run: LoggedRunner, mnt: Path) -> None:
        run.step(f"installing the conda installer ({job.loaded.profile.conda.installer})")
        assemble.run_script(run, mnt, script, "installer")

    return _host_layer(steps, parent, work, job, grow_to_gib=job.loaded.profile.resources.disk)


def _make_env(layer: Layer, parent: Path, work: Path, job: LayerBuild) -> tuple[Path, dict]:
    name = layer.name.split(maxsplit=1)[1]
    script = job.build_dir / "provisioners" / CONDA_SCRIPT

    def steps(run: LoggedRunner, mnt: Path) -> None:
        run.step(f"installing the environment {name} on the host (native speed)")
        assemble.run_script(run, mnt, script, "env", name)

    return _host_layer(steps, parent, work, job)


def _make_client(layer: Layer, parent: Path, work: Path, job: LayerBuild) -> tuple[Path, dict]:
    provisioners, payload = job.build_dir / "provisioners", job.build_dir / "payload"

    def steps(run: LoggedRunner, mnt: Path) -> dict:
        run.step("installing the client's files, kernels and settings")
        assemble.run_script(run, mnt, provisioners / CONDA_SCRIPT, "finish")
        for name in _CLIENT_SCRIPTS:
            if (provisioners / name).is_file():
                assemble.run_script(run, mnt, provisioners / name)
        settings = mnt / "etc/factory/settings.sh"
        shutil.copyfile(payload / "settings.sh", settings)
        settings.chmod(0o644)
        (mnt / "etc/hostname").write_text(job.loaded.name.replace("_", "-") + "\n")
        run.step("removing the build's leftovers and trimming free space")
        assemble.seal(run, mnt)
        usage = shutil.disk_usage(mnt)
        run.step("reading the image's packages for its SBOM")
        return {
            "guest_disk": {"used_bytes": usage.used, "size_bytes": usage.total},
            "inventory": sbom.to_json(sbom.read_inventory(mnt)),
        }

    return _host_layer(steps, parent, work, job)


_MAKERS = {"system": _make_system, "conda": _make_conda, "env": _make_env, "client": _make_client}


def write_sbom(chain: list[Layer], store: LayerStore, staging: Path, loaded: LoadedProfile) -> None:
    """The delivery's SBOM, from the packages the client layer found in the image."""
    packages = sbom.from_json(_record(chain, "client", store, staging)["inventory"])
    sbom.write_sbom(packages, loaded.name, f"v{loaded.profile.version}", staging / sbom.SBOM_FILE)


def write_security_index(chain: list[Layer], store: LayerStore, staging: Path) -> None:
    """The delivery's security-index.json, from the system layer's record."""
    (staging / updates.INDEX_FILE).write_text(
        json.dumps(security_index(chain, store, staging), indent=1) + "\n"
    )
