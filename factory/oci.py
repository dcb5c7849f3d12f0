"""An OCI container image of a delivery: the same system, environments and client files as the
VM, from its delivered (sealed) qcow2, for clients that run containers.

The disk is mounted from the host through a throwaway overlay (assemble.mounted) and cut into
layers, in the order a cache keeps best: the system without kernel or bootloader, one layer per
conda environment, the client files, then the container's start script. umoci stacks the
layer tars and writes the image config; skopeo writes NAME.oci.tar (an OCI archive) and
NAME.docker.tar (`docker load`-able). Both are listed in SHA256SUMS (signed again when the
profile signs). Jupyter Lab is the default command, as the unprivileged `jupyter` user; its
token is made when a container starts, never baked in.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from factory import image_layout, signing
from factory.assemble import mounted, new_overlay
from factory.checksums import digests_of, write_checksums
from factory.delivery import Delivery, open_delivery
from factory.errors import FactoryError, InfrastructureError
from factory.files import staging_dir
from factory.processes import LoggedRunner
from factory.profile import LoadedProfile
from factory.resolve import image_environments

# command -> Debian package
OCI_TOOLS = {"umoci": "umoci", "skopeo": "skopeo", "tar": "tar"}
START_SCRIPT = "usr/local/bin/factory-container-start"
# What a container never needs: kernel, modules, firmware, bootloader; what the runtime
# provides (/dev, /proc, ...); and what must not leave the VM (host keys, the client's TLS key).
# Patterns for GNU tar --anchored, relative to the root.
SYSTEM_EXCLUDES = (
    "boot/*", "vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old",
    "usr/lib/modules/*", "lib/modules/*", "usr/lib/firmware/*", "lib/firmware/*",
    "usr/lib/grub", "usr/share/grub", "etc/grub.d", "etc/default/grub", "etc/default/grub.d",
    "dev/*", "proc/*", "sys/*", "run/*", "tmp/*", "var/tmp/*", "lost+found",
    "etc/ssh/ssh_host_*", "etc/machine-id", f"{image_layout.TLS_DIR.relative_to('/')}/*",
    f"{image_layout.JUPYTER_TOKEN_FILE.relative_to('/')}",
)  # fmt: skip
# The client's own files; everything not in the system or an environment layer lands here too.
CLIENT_PATHS = (image_layout.NOTEBOOKS_DIR.relative_to("/"),)
_REPOSITORY_PART = re.compile(r"[^a-z0-9._-]+")


@dataclass(frozen=True)
class ImageSpec:
    """What the image config says: its name, the Jupyter it starts, its labels."""

    name: str  # the delivery's name
    reference: str  # localhost/<client>_<project>:<version>
    version: str
    description: str
    jupyter_port: int | None
    environments: tuple[str, ...]


def image_spec(loaded: LoadedProfile) -> ImageSpec:
    profile = loaded.profile
    repository = _REPOSITORY_PART.sub("-", f"{profile.client}_{profile.project}".lower())
    version = re.sub(r"[^A-Za-z0-9_.-]", "-", str(profile.version))
    return ImageSpec(
        name=loaded.name,
        reference=f"localhost/{repository.strip('-._') or 'factory'}:{version}",
        version=str(profile.version),
        description=profile.description,
        jupyter_port=profile.jupyter.port if profile.jupyter.enabled else None,
        environments=tuple(env.name for env in image_environments(loaded)),
    )


def oci_artifacts(delivery: Delivery) -> list[Path]:
    """The delivery's container images, as export_oci names them."""
    return [
        delivery.path / f"{delivery.name}.oci.tar",
        delivery.path / f"{delivery.name}.docker.tar",
    ]


def check_tools() -> None:
    absent = sorted({OCI_TOOLS[t] for t in OCI_TOOLS if shutil.which(t) is None})
    if absent:
        raise InfrastructureError(
            f"the OCI export needs {', '.join(absent)}; install with: "
            f"apt-get install -y {' '.join(absent)}"
        )
    if os.geteuid() != 0:
        raise InfrastructureError(
            "the OCI export needs root (it mounts the delivered disk through a loop device); "
            "run factory as root (sudo -E factory ...)"
        )


# --- the layers -----------------------------------------------------------------------------


def _tar(
    run: LoggedRunner,
    root: Path,
    out: Path,
    members: list[str],
    excludes: tuple[str, ...] = (),
    parents_from: Path | None = None,
) -> Path:
    """A layer tar of `members` under `root`: numeric owners, capabilities kept. Each member's
    parent folders come first, as they are in the image (`parents_from`, default `root`):
    a layer without them would give them root's owner and mode in the container."""
    parents = sorted({str(p) for m in members for p in Path(m).parents})  # "." included
    run(
        "tar", "--create", "--file", str(out), "--format=posix", "--numeric-owner",
        "--sort=name", "--xattrs", "--xattrs-include=security.capability", "--anchored",
        *[f"--exclude={pattern}" for pattern in excludes],
        "--directory", str(parents_from or root), "--no-recursion",
        *[f"--add-file={name}" for name in parents],
        "--directory", str(root), "--recursion", *[f"--add-file={name}" for name in members],
    )  # fmt: skip
    return out


def _present(root: Path, paths) -> list[str]:
    return [str(p) for p in paths if (root / p).exists() or (root / p).is_symlink()]


def layer_plan(root: Path, spec: ImageSpec) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(comment, members, excludes) of each layer, base first: every file lands in one."""
    envs_dir = image_layout.CONDA_ENVS.relative_to("/")
    on_disk = (
        sorted(p.name for p in (root / envs_dir).iterdir()) if (root / envs_dir).is_dir() else []
    )
    env_layers = [e for e in spec.environments if e in on_disk]
    unlisted = [envs_dir / e for e in on_disk if e not in env_layers]  # left for the last layer
    later = [*(f"{envs_dir}/{e}" for e in on_disk), *map(str, CLIENT_PATHS)]
    system = (
        "system (no kernel or bootloader)",
        sorted(entry.name for entry in root.iterdir()),
        (*SYSTEM_EXCLUDES, *later),
    )
    envs = [(f"conda environment {e}", [f"{envs_dir}/{e}"], ()) for e in env_layers]
    client = ("client files", _present(root, [*CLIENT_PATHS, *unlisted]), ())
    return [system, *envs, client]


def start_script(spec: ImageSpec) -> str:
    """The container's default command: a fresh token (a container has no first boot), kept
    where the VM keeps it, then Jupyter Lab on every address of the container."""
    token_file = image_layout.JUPYTER_TOKEN_FILE
    return f"""#!/bin/sh
# Generated by factory: starts Jupyter Lab in a container of {spec.name}.
# A container has no first boot: the token is made at each start unless JUPYTER_TOKEN is given.
set -eu
if [ -z "${{JUPYTER_TOKEN:-}}" ]; then
    JUPYTER_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n')
fi
export JUPYTER_TOKEN
printf 'JUPYTER_TOKEN=%s\\n' "$JUPYTER_TOKEN" 2>/dev/null > {token_file} ||
    echo "factory: cannot write {token_file}; the token is in JUPYTER_TOKEN only" >&2
echo "factory: Jupyter Lab on port {spec.jupyter_port}; the token is in {token_file}"
cd {image_layout.NOTEBOOKS_DIR}
exec {image_layout.JUPYTER_ENV_PREFIX}/bin/jupyter lab --no-browser --ip=0.0.0.0 \\
    --port={spec.jupyter_port} --ServerApp.allow_remote_access=True "$@"
"""


def _start_layer(run: LoggedRunner, root: Path, spec: ImageSpec, work: Path) -> Path:
    """The start script and an empty token file that only `jupyter` may write."""
    tree = work / "start"
    script = tree / START_SCRIPT
    script.parent.mkdir(parents=True)
    script.write_text(start_script(spec))
    script.chmod(0o755)
    token = tree / image_layout.JUPYTER_TOKEN_FILE.relative_to("/")
    token.parent.mkdir(parents=True)
    token.touch(mode=0o600)
    uid, gid = _passwd_ids(root, "jupyter")
    os.chown(token, uid, gid)
    members = [START_SCRIPT, str(token.relative_to(tree))]
    return _tar(run, tree, work / "start.tar", members, parents_from=root)


def _passwd_ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 3 and fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise FactoryError(f"the image has no user {user!r}; it cannot run Jupyter as that user")


@contextlib.contextmanager
def _without_submounts(run: LoggedRunner, mnt: Path, work: Path) -> Iterator[Path]:
    """The image's root file system alone (a plain bind mount): its own empty /dev, /proc,
    /sys and /run instead of what `mounted` puts there for a chroot."""
    view = work / "view"
    view.mkdir()
    run("mount", "--bind", "-o", "ro", str(mnt), str(view))
    try:
        yield view
    finally:
        run("umount", str(view), check=False)


# --- the image ------------------------------------------------------------------------------


def _configure(run: LoggedRunner, image: str, spec: ImageSpec) -> None:
    envs = image_layout.CONDA_ENVS
    run(
        "umoci", "config", "--image", image, "--no-history",
        "--config.user", "jupyter",
        "--config.workingdir", str(image_layout.NOTEBOOKS_DIR),
        "--config.env", f"PATH={envs}/jupyter/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                        "/usr/bin:/sbin:/bin",
        "--config.env", f"HOME={image_layout.JUPYTER_HOME}",
        "--config.env", "LANG=C.UTF-8",
        "--config.cmd", f"/{START_SCRIPT}",
        "--config.exposedports", f"{spec.jupyter_port}/tcp",
        "--config.stopsignal", "SIGTERM",
        "--config.label", f"org.opencontainers.image.title={spec.name}",
        "--config.label", f"org.opencontainers.image.version={spec.version}",
        "--config.label", f"org.opencontainers.image.description={spec.description}",
        "--config.label", f"org.opencontainers.image.ref.name={spec.reference}",
    )  # fmt: skip


def build_image(run: LoggedRunner, qcow2: Path, spec: ImageSpec, work: Path) -> Path:
    """An OCI image layout in work/layout, tagged `image`, made from the delivered disk."""
    layout = work / "layout"
    image = f"{layout}:image"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", image)
    overlay = new_overlay(run, qcow2.resolve(), work / "overlay.qcow2")
    mount_work = work / "mount"
    mount_work.mkdir()
    with mounted(run, overlay, mount_work) as mnt, _without_submounts(run, mnt, work) as root:
        for number, (comment, members, excludes) in enumerate(layer_plan(root, spec), 1):
            if not members:
                continue
            run.step(f"oci: layer {number}: {comment}")
            layer = _tar(run, root, work / f"layer{number}.tar", members, excludes)
            run("umoci", "raw", "add-layer", "--image", image,
                "--history.created_by", "factory export --format oci",
                "--history.comment", comment, str(layer))  # fmt: skip
            layer.unlink()
        run.step("oci: layer: container start")
        start = _start_layer(run, root, spec, work)
        run("umoci", "raw", "add-layer", "--image", image,
            "--history.created_by", "factory export --format oci",
            "--history.comment", "container start (Jupyter Lab, token made at start)",
            str(start))  # fmt: skip
    overlay.unlink()
    _configure(run, image, spec)
    return layout


def write_archives(run: LoggedRunner, layout: Path, spec: ImageSpec, targets: list[Path]) -> None:
    """The OCI archive and the docker archive of the layout, at `targets` (in that order)."""
    oci_tar, docker_tar = targets
    for target, transport in ((oci_tar, "oci-archive"), (docker_tar, "docker-archive")):
        run.step(f"oci: writing {target.name}")
        run("skopeo", "copy", "--quiet", f"oci:{layout}:image",
            f"{transport}:{target}:{spec.reference}")  # fmt: skip


def record_checksums(delivery: Delivery, signer: signing.Signer | None) -> Path:
    """SHA256SUMS lists the disk images and the container images (signed again)."""
    files = [*delivery.artifacts, *(p for p in oci_artifacts(delivery) if p.is_file())]
    path = write_checksums(delivery.path, files, digests_of(files))
    if signer is not None:
        signing.sign_checksums(delivery.path, signer)
    return path


def export_oci(path: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Write NAME.oci.tar and NAME.docker.tar into the delivery at `path`; returns them."""
    check_tools()
    opened = open_delivery(path)
    delivery, loaded = opened.delivery, opened.loaded
    spec = image_spec(loaded)
    if spec.jupyter_port is None:
        raise FactoryError(
            f"{delivery.path}: jupyter.enabled is false in its profile; the container's command "
            "is Jupyter Lab, so export a delivery built with Jupyter"
        )
    signer = signing.profile_signer(loaded)
    targets = oci_artifacts(delivery)
    logs = delivery.path.parent / "logs"
    logs.mkdir(exist_ok=True)
    logfile = logs / f"{delivery.name}-oci.log"
    with delivery.lock(), staging_dir(delivery.path) as work, open(logfile, "w") as logf:
        run = LoggedRunner(logf, logfile, log)
        run.step(f"oci: image {spec.reference} from {delivery.qcow2.name}")
        layout = build_image(run, delivery.qcow2, spec, work)
        scratch = [work / target.name for target in targets]
        write_archives(run, layout, spec, scratch)
        mode = delivery.qcow2.stat().st_mode & 0o777  # private deliveries stay private
        for made, target in zip(scratch, targets, strict=True):
            made.chmod(mode)
            os.replace(made, target)
        record_checksums(delivery, signer)
    return targets
