"""The Debian base image recipe: mmdebstrap, an MBR disk, the guest's configuration and GRUB.

This file's whole text keys the base image cache (factory.base.debian.recipe_fingerprint), so
any edit here builds a new base image; keep the recipe, and only the recipe, in it.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
import uuid
from pathlib import Path

from factory.base.mounts import is_mounted
from factory.errors import ToolError
from factory.processes import LoggedRunner, signals_deferred

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
# no_timer_check: on a busy host (emulated, or with its cores oversubscribed) the kernel's boot
# test of the timer interrupt can time out and panic ("IO-APIC + timer doesn't work"); images
# made for virtual machines skip that test.
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200n8 no_timer_check"
PART_START_SECTOR = 2048
# A disk the importer made larger: the root partition, then its file system, grow to its end.
GROWROOT_SCRIPT = """\
#!/bin/sh
set -eu
part=$(findmnt -nvo SOURCE /)
disk=/dev/$(lsblk -no PKNAME "$part")
number=$(cat "/sys/class/block/${part##*/}/partition")
if out=$(growpart "$disk" "$number" 2>&1); then
    resize2fs "$part"
elif [ "${out#NOCHANGE}" = "$out" ]; then
    echo "$out" >&2
    exit 1
fi
"""
GROWROOT_UNIT = """\
[Unit]
Description=Grow the root file system to the end of its disk
After=systemd-remount-fs.service
Before=ssh.service factory-firstboot.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/factory-growroot

[Install]
WantedBy=multi-user.target
"""
SECTOR = 512


def build_disk(
    workdir: Path, suite: str, sources: list[str], run: LoggedRunner, packages: list[str]
) -> Path:
    """Build the base image in `workdir`; return its qcow2. Mounts and loop devices are
    released whatever happens."""
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
        kernel = configure_rootfs(mnt, root_uuid, run)
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
        _write(mnt / "boot/grub/grub.cfg", grub_cfg(root_uuid, kernel))
        run("sync")
    finally:
        with signals_deferred():
            teardown(run, mounts, loops)

    run.step("compressing to qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(qcow2))
    raw.unlink()
    return qcow2


def teardown(run: LoggedRunner, mounts: list[Path], loops: list[str]) -> None:
    for point in reversed(mounts):
        for attempt in range(3):
            if not is_mounted(point):
                break
            if attempt:
                time.sleep(1)
            run("umount", *(["--lazy"] if attempt == 2 else []), str(point), check=False)
        if is_mounted(point):
            run.note(f"could not unmount {point}")
    for loop in reversed(loops):
        run("losetup", "-d", loop, check=False)


def chroot_command(mnt: Path) -> list[str]:
    """The prefix that runs a command in the image's root with a clean environment."""
    env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]
    return ["chroot", str(mnt), "env", "-i", *env, "HOME=/root"]


def _chroot(run: LoggedRunner, mnt: Path, *cmd: str) -> str:
    return run(*chroot_command(mnt), *cmd)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


def configure_rootfs(mnt: Path, root_uuid: str, run: LoggedRunner) -> str:
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
    # The seeds importers give (Proxmox: NoCloud or ConfigDrive; vSphere: guestinfo). With more
    # than one, ds-identify looks for them, and a VM booted without any (an importer's first
    # boot) runs no cloud-init at all: over a minute of that boot under emulation.
    _write(
        mnt / "etc/cloud/cloud.cfg.d/90-factory-datasource.cfg",
        "datasource_list: [ NoCloud, ConfigDrive, VMware, None ]\n",
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
    # cloud-init grows the root only when it runs (a seed); this grows it on every boot.
    _write(mnt / "usr/local/sbin/factory-growroot", GROWROOT_SCRIPT, mode=0o755)
    _write(mnt / "etc/systemd/system/factory-growroot.service", GROWROOT_UNIT)
    _chroot(
        run,
        mnt,
        "systemctl",
        "enable",
        "systemd-networkd.service",
        "systemd-resolved.service",
        "ssh.service",
        "factory-ssh-hostkeys.service",
        "factory-growroot.service",
    )
    # It reaps e2scrub's LVM snapshots; these images have no LVM.
    _chroot(run, mnt, "systemctl", "mask", "e2scrub_reap.service")

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


def grub_cfg(root_uuid: str, kernel: str) -> str:
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
