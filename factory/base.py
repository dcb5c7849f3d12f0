"""The base OS stage: a locally built Debian qcow2, or a downloaded cloud image, both cached."""

from __future__ import annotations

import ast
import contextlib
import datetime
import fcntl
import hashlib
import http.client
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from factory import host, updates
from factory.cache import cache_dir, inputs_key, sha256_file
from factory.download import local_write_error
from factory.errors import FactoryError, ToolError
from factory.processes import die_with_parent, stop_gently

DEBIAN_RELEASES = {
    "debian-12": {"suite": "bookworm", "mirror": "http://deb.debian.org/debian"},
}

DEBIAN_PACKAGES = (
    "linux-image-amd64",
    "grub-pc",
    "initramfs-tools",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "openssh-server",
    "cloud-init",
    "cloud-guest-utils",
    "sudo",
    "qemu-guest-agent",
    "ca-certificates",
    "iproute2",
    "locales",
    "python3",
    "curl",
    "zstd",
    "less",
    "procps",
    # The services every factory image may run; the system stage configures or disables them.
    "nginx",
    "openssl",
    "nftables",
    "auditd",
    "prometheus-node-exporter",
    "unattended-upgrades",
)
COMPONENTS = "main,contrib,non-free,non-free-firmware"
DISK_SIZE_GIB = 4
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200n8"
# Bump when the recipe changes in a way the source fingerprint below cannot see.
RECIPE_VERSION = "1"

PART_START_SECTOR = 2048
SECTOR = 512

_TOOLS = {  # command -> Debian package that provides it
    "mmdebstrap": "mmdebstrap",
    "sfdisk": "fdisk",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "mkfs.ext4": "e2fsprogs",
    "tar": "tar",
    "chroot": "coreutils",
    "qemu-img": "qemu-utils",
}

DOWNLOAD_SCHEMES = ("http", "https", "file")
DOWNLOAD_RETRIES = 3
DOWNLOAD_BACKOFF_S = 1.0
_IMAGE_SUFFIXES = (".qcow2", ".img", ".raw", ".vmdk")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")

Log = Callable[[str], None]


# --------------------------------------------------------------------------- Debian base


def debian_base_image(
    release: str = "debian-12",
    mirror: str | None = None,
    log: Callable[[str], None] = print,
    rebuild: bool = False,
    extra_packages: tuple[str, ...] = (),
) -> Path:
    """Return the cached qcow2 for a locally built Debian base, building it if absent.
    `extra_packages` make a separate layer (e.g. the GPU driver, built by DKMS for the
    image's kernel while the base is made)."""
    if release not in DEBIAN_RELEASES:
        known = ", ".join(sorted(DEBIAN_RELEASES))
        raise FactoryError(f"base.release: unknown release {release!r}; use one of: {known}")
    suite = DEBIAN_RELEASES[release]["suite"]
    mirror = (mirror or DEBIAN_RELEASES[release]["mirror"]).rstrip("/")
    if urllib.parse.urlsplit(mirror).scheme not in DOWNLOAD_SCHEMES:
        raise FactoryError(
            f"base.mirror: {mirror!r} is not an http://, https:// or file:// URL; "
            "give the URL of a Debian mirror"
        )
    inputs = {
        "release": release,
        "suite": suite,
        "mirror": mirror,
        "sources": updates.apt_sources(mirror, suite, COMPONENTS.split(",")),
        # A newly published security update makes a new base layer.
        "security_index": updates.index_state(mirror, suite, COMPONENTS.split(",")),
        "components": COMPONENTS,
        "packages": sorted({*DEBIAN_PACKAGES, *extra_packages}),
        "disk_size_gib": DISK_SIZE_GIB,
        "kernel_cmdline": KERNEL_CMDLINE,
        "recipe": _recipe_fingerprint(),
    }
    base_dir = cache_dir() / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    name = f"{release}-{inputs_key(inputs)}"
    image = base_dir / f"{name}.qcow2"
    sidecar = base_dir / f"{name}.json"
    logfile = base_dir / f"{name}.log"

    if not rebuild and _cached_ok(image, sidecar, log):
        return image

    _check_build_host()
    with _locked(base_dir / f"{name}.lock", log):
        # Another process may have built it while we waited for the lock.
        if not rebuild and _cached_ok(image, sidecar, log, quiet=True):
            return image
        for stale in (sidecar, image):
            stale.unlink(missing_ok=True)
        _remove_stale_workdirs(base_dir, name, log)
        workdir = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=base_dir))
        try:
            with _sigterm_as_exit():
                started = time.monotonic()
                log(f"{release}: building base image (full log: {logfile})")
                with open(logfile, "w", encoding="utf-8") as logf:
                    runner = _Runner(logf, logfile, log)
                    built = _build(workdir, suite, inputs["sources"], runner, inputs["packages"])
                    seconds = round(time.monotonic() - started, 1)
                    log(f"{release}: checksumming the image")
                    meta = {
                        "name": name,
                        "inputs": inputs,
                        "sha256": sha256_file(built),
                        "size": built.stat().st_size,
                        "built_at": datetime.datetime.now(datetime.UTC).isoformat(
                            timespec="seconds"
                        ),
                        "build_seconds": seconds,
                        "kernel": runner.facts.get("kernel"),
                        "root_uuid": runner.facts.get("root_uuid"),
                        "log": str(logfile),
                    }
                    tmp_sidecar = workdir / "sidecar.json"
                    tmp_sidecar.write_text(json.dumps(meta, indent=2) + "\n")
                    # qcow2 first, sidecar last: an entry without a sidecar is never reused.
                    os.replace(built, image)
                    os.replace(tmp_sidecar, sidecar)
                log(f"{release}: built {image} in {seconds:.0f} s ({meta['size'] >> 20} MiB)")
                return image
        finally:
            remove_unless_mounted(workdir, log)


def _cached_ok(image: Path, sidecar: Path, log: Log, quiet: bool = False) -> bool:
    if not image.exists():
        return False
    try:
        meta = json.loads(sidecar.read_text())
        expected = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        if not quiet:
            log(f"cached base image {image.name} has no valid sidecar; rebuilding")
        return False
    if sha256_file(image) != expected:
        if not quiet:
            log(f"cached base image {image.name} is corrupt (sha256 mismatch); rebuilding")
        return False
    return True


def _check_build_host() -> None:
    host.require_root_and_tools(
        "building the Debian base image",
        "mmdebstrap --mode=root, loop devices, mount",
        _TOOLS,
        "run factory as root, or use a prebuilt cloud image via base.url",
    )


@contextlib.contextmanager
def _locked(lockfile: Path, log: Log) -> Iterator[None]:
    with open(lockfile, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build of {lockfile.stem} to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mounts") as handle:
        for line in handle:
            point = line.split()[1].replace("\\040", " ")
            if point.startswith(prefix) or point == prefix[:-1]:
                found.append(point)
    return found


def remove_unless_mounted(workdir: Path, log: Log) -> None:
    """Remove a work folder, but never across a mount point: a leftover bind mount of /dev
    would empty the host's."""
    busy = _mounts_under(workdir)
    if busy:
        log(f"not removing {workdir}: still mounted: {', '.join(busy)}; unmount, then delete it")
        return
    shutil.rmtree(workdir, ignore_errors=True)


def _remove_stale_workdirs(base_dir: Path, name: str, log: Log) -> None:
    # Called with the lock held, so these belong to builds that died (e.g. SIGKILL).
    for stale in base_dir.glob(f".build-{name}-*"):
        if stale.is_dir():
            remove_unless_mounted(stale, log)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `finally` blocks unmount and detach on kill too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while cleaning up, then deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in sigs
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            if pending[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + pending[0])


class _Runner:
    """Runs build commands with their output in the log file, one progress line per step."""

    def __init__(self, logf, logfile: Path, log: Log) -> None:
        self.logf = logf
        self.logfile = logfile
        self.log = log
        self.facts: dict[str, str] = {}

    def step(self, message: str) -> None:
        self.log(message)
        self.note(f"=== {message}")

    def note(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        self.logf.write(f"[{stamp}] {message}\n")
        self.logf.flush()

    def __call__(
        self, *cmd: str, input: str | None = None, capture: bool = False, check: bool = True
    ) -> str:
        self.note("$ " + " ".join(cmd))
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else self.logf,
            stderr=self.logf,
            text=True,
            preexec_fn=die_with_parent,
        )
        try:
            out, _ = proc.communicate(input)
        except BaseException:
            stop_gently(proc, 30)  # mmdebstrap cleans up its own mounts on SIGTERM
            raise
        if capture and out:
            self.logf.write(out)
            self.logf.flush()
        if check and proc.returncode != 0:
            raise ToolError(
                f"{cmd[0]} failed (exit {proc.returncode}): {self._last_line()}; "
                f"full log: {self.logfile}"
            )
        return out or ""

    def _last_line(self) -> str:
        self.logf.flush()
        with open(self.logfile, encoding="utf-8", errors="replace") as handle:
            lines = [
                line.strip()
                for line in handle.read()[-8192:].splitlines()
                if line.strip() and not line.startswith("[")
            ]
        return lines[-1][:200] if lines else "no output"


# The build recipe. Its functions' syntax trees (not formatting or comments) key the cache.


def _build(
    workdir: Path, suite: str, sources: list[str], run: _Runner, packages: list[str]
) -> Path:
    rootfs = workdir / "rootfs.tar"
    raw = workdir / "disk.raw"
    mnt = workdir / "mnt"
    qcow2 = workdir / "disk.qcow2"

    run.step(f"mmdebstrap {suite} with its updates and security suites (a few minutes)")
    # Naming a mirror turns off mmdebstrap's own updates and security entries: list all three.
    run(
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--include=" + ",".join(packages),
        suite,
        str(rootfs),
        *sources,
    )

    run.step(f"partitioning a {DISK_SIZE_GIB} GiB disk")
    with open(raw, "wb") as handle:
        handle.truncate(DISK_SIZE_GIB << 30)
    run("sfdisk", str(raw), input=f"label: dos\nstart={PART_START_SECTOR}, type=83, bootable\n")
    table = json.loads(run("sfdisk", "--json", str(raw), capture=True))
    part = table["partitiontable"]["partitions"][0]
    offset = part["start"] * SECTOR
    size = part["size"] * SECTOR

    loops: list[str] = []
    mounts: list[Path] = []
    try:
        disk_loop = run("losetup", "-f", "--show", str(raw), capture=True).strip()
        loops.append(disk_loop)
        part_loop = run(
            "losetup",
            "-f",
            "--show",
            "-o",
            str(offset),
            "--sizelimit",
            str(size),
            str(raw),
            capture=True,
        ).strip()
        loops.append(part_loop)

        root_uuid = str(uuid.uuid4())
        run.facts["root_uuid"] = root_uuid
        run.step("creating the ext4 root filesystem")
        run("mkfs.ext4", "-q", "-F", "-L", "root", "-U", root_uuid, part_loop)
        mnt.mkdir()
        run("mount", part_loop, str(mnt))
        mounts.append(mnt)

        run.step("unpacking the root filesystem")
        run(
            "tar",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-xpf",
            str(rootfs),
            "-C",
            str(mnt),
        )
        rootfs.unlink()
        for source, target, extra in (
            ("/dev", "dev", ["--bind"]),
            ("proc", "proc", ["-t", "proc"]),
            ("sysfs", "sys", ["-t", "sysfs"]),
        ):
            run("mount", *extra, source, str(mnt / target))
            mounts.append(mnt / target)

        run.step("configuring the guest (locale, network, cloud-init, ssh)")
        kernel = _configure_rootfs(mnt, root_uuid, run)
        run.facts["kernel"] = kernel

        run.step(f"installing GRUB (kernel {kernel})")
        _chroot(
            run,
            mnt,
            "grub-install",
            "--target=i386-pc",
            "--boot-directory=/boot",
            "--modules=part_msdos ext2",
            disk_loop,
        )
        _write(mnt / "boot/grub/grub.cfg", _grub_cfg(root_uuid, kernel))
        run("sync")
    finally:
        with _signals_deferred():
            _teardown(run, mounts, loops)

    run.step("compressing to qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(qcow2))
    raw.unlink()
    return qcow2


def _teardown(run: _Runner, mounts: list[Path], loops: list[str]) -> None:
    for point in reversed(mounts):
        for attempt in range(3):
            if not _is_mounted(point):
                break
            if attempt:
                time.sleep(1)
            run("umount", *(["--lazy"] if attempt == 2 else []), str(point), check=False)
        if _is_mounted(point):
            run.note(f"could not unmount {point}")
    for loop in reversed(loops):
        run("losetup", "-d", loop, check=False)


def _is_mounted(point: Path) -> bool:
    return str(point.resolve()) in _mounts_under(point)


def chroot_command(mnt: Path) -> list[str]:
    """The prefix that runs a command in the image's root with a clean environment."""
    env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]
    return ["chroot", str(mnt), "env", "-i", *env, "HOME=/root"]


def _chroot(run: _Runner, mnt: Path, *cmd: str) -> str:
    return run(*chroot_command(mnt), *cmd)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


def _configure_rootfs(mnt: Path, root_uuid: str, run: _Runner) -> str:
    kernels = sorted((mnt / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ToolError(f"no kernel in {mnt}/boot after mmdebstrap; full log: {run.logfile}")
    kernel = kernels[-1].name.removeprefix("vmlinuz-")
    if not (mnt / f"boot/initrd.img-{kernel}").exists():
        _chroot(run, mnt, "update-initramfs", "-c", "-k", kernel)

    _write(mnt / "etc/fstab", f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n")
    _write(mnt / "etc/hostname", "localhost\n")
    _write(
        mnt / "etc/hosts",
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    )
    resolv = mnt / "etc/resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")

    # cloud-init's locale module fails without a generated default locale.
    _write(mnt / "etc/locale.gen", "en_US.UTF-8 UTF-8\n")
    _chroot(run, mnt, "locale-gen")
    _chroot(run, mnt, "update-locale", "LANG=en_US.UTF-8")

    _write(
        mnt / "etc/systemd/network/80-factory-dhcp.network",
        "# Fallback when no cloud-init network config applies (e.g. imported into VMware).\n"
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
    )
    _write(
        mnt / "etc/cloud/cloud.cfg.d/90-factory-datasource.cfg",
        "datasource_list: [ NoCloud, None ]\n",
    )
    # Without a seed (an importer's first boot) cloud-init would create its default user.
    _write(mnt / "etc/cloud/cloud.cfg.d/91-factory-no-default-user.cfg", "users: []\n")
    # Host keys are deleted below; cloud-init normally regenerates them, this covers the rest.
    _write(
        mnt / "etc/systemd/system/factory-ssh-hostkeys.service",
        textwrap.dedent(
            """\
            [Unit]
            Description=Generate missing SSH host keys
            After=cloud-init.service
            Before=ssh.service
            ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

            [Service]
            Type=oneshot
            ExecStart=/usr/bin/ssh-keygen -A

            [Install]
            WantedBy=ssh.service
            """
        ),
    )
    _chroot(
        run,
        mnt,
        "systemctl",
        "enable",
        "systemd-networkd.service",
        "systemd-resolved.service",
        "ssh.service",
        "factory-ssh-hostkeys.service",
    )

    grub_default = mnt / "etc/default/grub"
    text = grub_default.read_text() if grub_default.exists() else ""
    for key, value in (("GRUB_TIMEOUT", "1"), ("GRUB_CMDLINE_LINUX", f'"{KERNEL_CMDLINE}"')):
        line = f"{key}={value}"
        text, count = re.subn(rf"^{key}=.*$", line, text, flags=re.M)
        if not count:
            text = text.rstrip("\n") + f"\n{line}\n"
    _write(grub_default, text)

    _chroot(run, mnt, "passwd", "--lock", "root")
    _write(mnt / "etc/machine-id", "", mode=0o444)
    dbus_id = mnt / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
    for key in (mnt / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    _chroot(run, mnt, "apt-get", "clean")
    clear_apt_lists(mnt)
    return kernel


def clear_apt_lists(mnt: Path) -> None:
    """Remove the package lists apt downloaded into the image at `mnt` (its lock stays)."""
    lists = mnt / "var/lib/apt/lists"
    for entry in lists.iterdir() if lists.exists() else ():
        if entry.is_file() and entry.name != "lock":
            entry.unlink()


def _grub_cfg(root_uuid: str, kernel: str) -> str:
    return textwrap.dedent(
        f"""\
        # Written by factory: grub-mkconfig writes no kernel entries on a loop device.
        # Running update-grub inside the guest regenerates it from /etc/default/grub.
        set default=0
        set timeout=1
        insmod part_msdos
        insmod ext2
        search --no-floppy --fs-uuid --set=root {root_uuid}
        menuentry 'Debian GNU/Linux, with Linux {kernel}' {{
            linux /boot/vmlinuz-{kernel} root=UUID={root_uuid} ro {KERNEL_CMDLINE}
            initrd /boot/initrd.img-{kernel}
        }}
        """
    )


_RECIPE_FUNCTIONS = (_build, _teardown, _chroot, _write, _configure_rootfs, _grub_cfg)


def _recipe_fingerprint() -> str:
    """Hash of the recipe's syntax trees, so editing the recipe rebuilds the image."""
    digest = hashlib.sha256(RECIPE_VERSION.encode())
    for func in _RECIPE_FUNCTIONS:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
        except (OSError, TypeError, SyntaxError):
            return RECIPE_VERSION  # no source available (e.g. frozen): the version alone
        digest.update(ast.dump(tree).encode())
    return f"{RECIPE_VERSION}-{digest.hexdigest()[:12]}"


# --------------------------------------------------------------------------- cloud images


def cloud_base_image(url: str, sha256: str, log: Callable[[str], None] = print) -> Path:
    """Download (http/https/file URL) into the cache, verify sha256, return the cached path."""
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256.strip()):
        raise FactoryError(
            f"base.sha256: {sha256!r} is not a sha256 (64 hex digits); "
            "copy it from the image's SHA256SUMS file"
        )
    sha256 = sha256.strip().lower()
    parts = urllib.parse.urlsplit(url if isinstance(url, str) else "")
    if parts.scheme not in DOWNLOAD_SCHEMES or not (parts.netloc or parts.path):
        raise FactoryError(
            f"base.url: {url!r} is not an http://, https:// or file:// URL; "
            "fix the image URL in the profile"
        )
    suffix = Path(urllib.parse.unquote(parts.path)).suffix.lower()
    if suffix not in _IMAGE_SUFFIXES:
        suffix = ".qcow2"
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / f"{sha256}{suffix}"

    if target.exists():
        if sha256_file(target) == sha256:
            return target
        log(f"cached download {target.name} is corrupt (sha256 mismatch); downloading again")
        target.unlink()

    fd, tmp_name = tempfile.mkstemp(prefix=f".{sha256[:16]}-", suffix=".part", dir=downloads)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log(f"downloading {url}")
        got = _download(url, tmp)
        if got != sha256:
            raise FactoryError(
                f"base.sha256: checksum mismatch for {url}: expected {sha256}, got {got}; "
                "check the URL and the sha256 in the profile"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"verified sha256 of {url}: {target}")
    return target


def _download(url: str, dest: Path) -> str:
    """Stream url to dest, retrying transient network errors; return the sha256 of the data."""
    attempt = 0
    while True:
        try:
            digest = hashlib.sha256()
            request = urllib.request.Request(url, headers={"User-Agent": "factory"})
            with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            return digest.hexdigest()
        except urllib.error.HTTPError as exc:
            if (exc.code < 500 and exc.code != 429) or attempt >= DOWNLOAD_RETRIES:
                raise FactoryError(
                    f"base.url: cannot download {url}: HTTP {exc.code} {exc.reason}; "
                    "check the URL in the profile"
                ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            local = local_write_error(exc, dest)
            if local is not None:
                raise local from None
            reason = getattr(exc, "reason", None) or exc
            if url.startswith("file:"):
                raise FactoryError(
                    f"base.url: cannot read {url}: {reason}; check the path in the profile"
                ) from None
            if attempt >= DOWNLOAD_RETRIES:
                raise FactoryError(
                    f"base.url: cannot download {url} after {attempt + 1} attempts: {reason}; "
                    "check the URL and the network"
                ) from None
        time.sleep(DOWNLOAD_BACKOFF_S * 2**attempt)
        attempt += 1
