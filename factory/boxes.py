"""Vagrant boxes for testers, and the versioned box catalog that `vagrant box add` reads.

A box carries the delivered disk unchanged, plus a small NoCloud seed disk (label cidata) that
creates a `vagrant` user with Vagrant's well-known insecure key on first boot. The seed lives
only in tester boxes: the OVA and the qcow2 never hold that key, and `vagrant up` replaces it.

Layout: <boxes>/<client>_<project>/ holds <delivery>-<provider>.box for every delivery and
<client>_<project>.json, the catalog, with one entry per version and provider.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from factory import __version__, seed
from factory.cache import sha256_file
from factory.cpu import DEFAULT_LEVEL, validation_cpu
from factory.errors import FactoryError
from factory.escape import cloud_config
from factory.export import (
    VirtualHardware,
    convert_to_stream_vmdk,
    input_disk_format,
    qemu_img_info,
    render_ovf,
    run_tool,
    virtual_hardware,
)
from factory.files import staging_dir, write_text_atomically
from factory.templates import render_template

# format name (as given to --format) -> Vagrant provider name
BOX_FORMATS = {"vagrant-libvirt": "libvirt", "vagrant-virtualbox": "virtualbox"}
VAGRANT_USER = "vagrant"
# Vagrant's published insecure key: every box uses it, and Vagrant swaps it on first `up`.
VAGRANT_INSECURE_KEY = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEF"
    "HzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9"
    "D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0j"
    "MZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9"
    "c9WhQ== vagrant insecure public key"
)
if TYPE_CHECKING:
    from factory.profile import LoadedProfile

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")


@dataclass(frozen=True)
class BoxSpec:
    """What a tester box is made of: the delivered disk and the machine around it."""

    box_name: str  # the catalog's name, <client>/<project>
    version: str  # the delivery version
    hardware: VirtualHardware
    jupyter_port: int | None  # None when the profile has no Jupyter
    cpu_baseline: str = DEFAULT_LEVEL  # the profile's: the box boots at that level

    @property
    def slug(self) -> str:
        return self.box_name.replace("/", "_")


def parse_formats(text: str, allowed: tuple[str, ...]) -> list[str]:
    """'ova,vagrant-libvirt' -> ['ova', 'vagrant-libvirt'], in order, without repeats."""
    formats = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [f for f in formats if f not in allowed]
    if unknown or not formats:
        raise FactoryError(
            f"--format {text!r}: unknown format {', '.join(map(repr, unknown)) or '(none)'}; "
            f"use a comma-separated list of: {', '.join(allowed)}"
        )
    return list(dict.fromkeys(formats))


def check_box_url(base_url: str | None) -> None:
    if base_url is not None and not _URL.match(base_url):
        raise FactoryError(
            f"--box-url {base_url!r} is not a URL; give where the box folder will be published, "
            "e.g. https://boxes.example.com/demo_hello/ or file:///srv/boxes/demo_hello/"
        )


# --- the pieces of a box --------------------------------------------------------------------


def render_box_vagrantfile(spec: BoxSpec, provider: str) -> str:
    # libvirt boots the box as validate and deploy boot the delivery: at the profile's CPU
    # level, and without KVM at most at the level TCG emulates faithfully, with AMD's vendor id.
    kvm, tcg = (validation_cpu(spec.cpu_baseline, accel) for accel in ("kvm", "tcg"))
    return render_template(
        "box-Vagrantfile.j2",
        factory_version=__version__,
        box_name=spec.box_name,
        version=spec.version,
        provider=provider,
        cpus=spec.hardware.cpus,
        memory_mib=spec.hardware.memory_mib,
        jupyter_port=spec.jupyter_port,
        cpu_baseline=spec.cpu_baseline,
        kvm_cpu_model=kvm.model,
        tcg_cpu_model=tcg.model,
        tcg_cpu=tcg.qemu_cpu,
    )


def write_tester_seed(folder: Path, spec: BoxSpec) -> Path:
    """A NoCloud seed ISO (label cidata) that creates the vagrant user; returns its path."""
    login = seed.temporary_login(VAGRANT_USER, VAGRANT_INSECURE_KEY)
    return seed.write_seed_iso(
        folder,
        cloud_config({**login, "ssh_pwauth": False}),
        seed.meta_data(f"vagrant-{spec.hardware.name}", spec.slug.replace("_", "-")),
    )


def _pack_box(box: Path, folder: Path, members: list[str]) -> None:
    """A box is a tar; pax (not ustar) because a box's disk may pass 8 GiB. -h follows the
    link to the delivered disk instead of copying it first."""
    run_tool(
        ["tar", "--format=posix", "-h", "--owner=0", "--group=0", "--numeric-owner",
         "-cf", str(box), "-C", str(folder), *members],
        f"packing {box.name}",
    )  # fmt: skip


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.symlink(source.resolve(), target)
    except OSError:
        shutil.copy2(source, target)


def write_libvirt_box(qcow2: Path, spec: BoxSpec, out_dir: Path, log: Callable = print) -> Path:
    """out_dir/<name>-libvirt.box: box.img (the delivered qcow2, unchanged) and seed.img."""
    fmt = input_disk_format(qcow2)
    if fmt != "qcow2":
        raise FactoryError(f"{qcow2} is {fmt}; a libvirt box needs the delivered qcow2")
    target = out_dir / f"{spec.hardware.name}-libvirt.box"
    with staging_dir(out_dir) as staging:
        log(f"export: writing libvirt box {target.name}")
        _link_or_copy(qcow2, staging / "box.img")
        # vagrant-libvirt only takes qcow2 disks; the seed's ISO 9660 filesystem stays readable
        # on the virtual disk, which is where NoCloud looks for the label cidata.
        seed = write_tester_seed(staging, spec)
        seed_img = staging / "seed.img"
        run_tool(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(seed), str(seed_img)],
            "converting the tester seed",
        )
        virtual_gib = math.ceil(qemu_img_info(qcow2)["virtual-size"] / 2**30)
        metadata = {
            "provider": "libvirt",
            "format": "qcow2",
            "virtual_size": virtual_gib,
            # vagrant-libvirt >= 0.7 attaches every disk listed here, in order.
            "disks": [{"path": "box.img"}, {"path": "seed.img"}],
        }
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (staging / "Vagrantfile").write_text(render_box_vagrantfile(spec, "libvirt"))
        scratch = staging / target.name
        _pack_box(scratch, staging, ["metadata.json", "Vagrantfile", "box.img", "seed.img"])
        os.replace(scratch, target)
    return target


def write_virtualbox_box(qcow2: Path, spec: BoxSpec, out_dir: Path, log: Callable = print) -> Path:
    """out_dir/<name>-virtualbox.box: box.ovf with the system disk and the seed disk as VMDKs."""
    fmt = input_disk_format(qcow2)
    target = out_dir / f"{spec.hardware.name}-virtualbox.box"
    with staging_dir(out_dir) as staging:
        log(f"export: writing VirtualBox box {target.name}")
        system = convert_to_stream_vmdk(qcow2, fmt, staging / "box-disk001.vmdk")
        seed = write_tester_seed(staging, spec)
        seed_disk = convert_to_stream_vmdk(seed, "raw", staging / "box-disk002.vmdk")
        (staging / "box.ovf").write_text(
            render_ovf(spec.hardware, [system, seed_disk], digest="sha1"), encoding="utf-8"
        )
        (staging / "metadata.json").write_text(json.dumps({"provider": "virtualbox"}) + "\n")
        (staging / "Vagrantfile").write_text(render_box_vagrantfile(spec, "virtualbox"))
        scratch = staging / target.name
        disks = ["box-disk001.vmdk", "box-disk002.vmdk"]
        _pack_box(scratch, staging, ["box.ovf", *disks, "metadata.json", "Vagrantfile"])
        os.replace(scratch, target)
    return target


# --- the catalog ----------------------------------------------------------------------------


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in version.split("."))


def read_catalog(path: Path, box_name: str) -> dict:
    """The catalog at path, or a new one; refuse one that is not ours to extend."""
    if not path.exists():
        return {"name": box_name, "versions": []}
    try:
        catalog = json.loads(path.read_text())
        names = [v["version"] for v in catalog["versions"]]
    except (ValueError, KeyError, TypeError):
        raise FactoryError(
            f"{path} is not a Vagrant box catalog; move it away and export again"
        ) from None
    if catalog.get("name") != box_name:
        raise FactoryError(
            f"{path} is the catalog of {catalog.get('name')!r}, not {box_name!r}; "
            "give another --boxes folder"
        )
    if len(names) != len(set(names)):
        raise FactoryError(f"{path} lists a version twice; fix or remove it and export again")
    return catalog


def update_catalog(
    path: Path, spec: BoxSpec, boxes: dict[str, Path], base_url: str, description: str = ""
) -> Path:
    """Add (or replace) this version's providers in the catalog; other versions stay."""
    catalog = read_catalog(path, spec.box_name)
    if description:
        catalog["description"] = description
    versions = {v["version"]: v for v in catalog["versions"]}
    entry = versions.setdefault(spec.version, {"version": spec.version, "providers": []})
    providers = {p["name"]: p for p in entry["providers"]}
    for provider, box in boxes.items():
        providers[provider] = {
            "name": provider,
            "url": base_url.rstrip("/") + "/" + box.name,
            "checksum_type": "sha256",
            "checksum": sha256_file(box),
        }
    entry["providers"] = [providers[name] for name in sorted(providers)]
    ordered = {
        "name": catalog["name"],
        **({"description": catalog["description"]} if catalog.get("description") else {}),
        "versions": [versions[v] for v in sorted(versions, key=_version_key)],
    }
    return write_text_atomically(path, json.dumps(ordered, indent=2) + "\n")


# --- a delivery's boxes ---------------------------------------------------------------------

_WRITERS = {"libvirt": write_libvirt_box, "virtualbox": write_virtualbox_box}


def export_boxes(
    qcow2: Path,
    spec: BoxSpec,
    formats: list[str],
    box_dir: Path,
    base_url: str | None = None,
    description: str = "",
    log: Callable = print,
) -> list[Path]:
    """Write one box per format into box_dir, then list them in box_dir/<slug>.json.

    base_url is where box_dir will be published; by default its own file:// URL."""
    check_box_url(base_url)
    box_dir = Path(box_dir).resolve()
    box_dir.mkdir(parents=True, exist_ok=True)
    boxes = {}
    for fmt in formats:
        provider = BOX_FORMATS[fmt]
        boxes[provider] = _WRITERS[provider](Path(qcow2), spec, box_dir, log=log)
    catalog = update_catalog(
        box_dir / f"{spec.slug}.json", spec, boxes, base_url or box_dir.as_uri(), description
    )
    log(f"export: box catalog {catalog}")
    return [*boxes.values(), catalog]


def box_spec(loaded: LoadedProfile) -> BoxSpec:
    """The tester box of a profile: named <client>/<project>, versioned like the delivery."""
    profile = loaded.profile
    return BoxSpec(
        box_name=f"{profile.client}/{profile.project}",
        version=str(profile.version),
        hardware=virtual_hardware(loaded),
        jupyter_port=profile.jupyter.port if profile.jupyter.enabled else None,
        cpu_baseline=profile.cpu_baseline,
    )
