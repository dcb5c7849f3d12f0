"""The export stage, driven with the real qemu-img, tar, sha256sum and (if installed) COT."""

import dataclasses
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from factory import __version__
from factory.boxes import (
    VAGRANT_INSECURE_KEY,
    BoxSpec,
    export_boxes,
    render_box_vagrantfile,
    update_catalog,
    write_libvirt_box,
    write_virtualbox_box,
)
from factory.checksums import write_checksums
from factory.delivery import write_build_manifest
from factory.errors import FactoryError, ToolError
from factory.export import VirtualHardware, export_ova, export_qcow2

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed (Debian: qemu-utils)"
)

NS = {
    "ovf": "http://schemas.dmtf.org/ovf/envelope/1",
    "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
    "vssd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData",
    "vmw": "http://www.vmware.com/schema/ovf",
}
DISK_BYTES = 64 * 2**20
DESCRIPTION = 'Fraud <model> & "friends" for ACME'
HARDWARE = VirtualHardware(
    name="acme_fraud_v2", cpus=3, memory_mib=6144, disk_gib=1, description=DESCRIPTION
)


def quiet(*_args):
    pass


def qemu_img_info(path: Path) -> dict:
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, check=True
    )
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """A 64 MiB qcow2 with data at both ends, and the raw image it was made from."""
    work = tmp_path_factory.mktemp("source")
    raw = work / "source.raw"
    with open(raw, "wb") as handle:
        handle.truncate(DISK_BYTES)
        handle.write(hashlib.sha256(b"head").digest() * 4096)
        handle.seek(DISK_BYTES - 4096)
        handle.write(b"tail" * 1024)
    qcow2 = work / "built.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    return qcow2, raw


@pytest.fixture(scope="module", params=["sha256", "sha1"])
def ova(request, source, tmp_path_factory) -> tuple[Path, str, Path]:
    """An exported OVA, its digest, and the directory it was extracted into."""
    out_dir = tmp_path_factory.mktemp(f"out-{request.param}")
    ova = export_ova(source[0], HARDWARE, out_dir, digest=request.param, log=quiet)
    extracted = tmp_path_factory.mktemp(f"extracted-{request.param}")
    subprocess.run(["tar", "-xf", str(ova), "-C", str(extracted)], check=True)
    return ova, request.param, extracted


def test_only_the_ova_is_left_in_out_dir(ova):
    path, _digest, _extracted = ova
    assert path.name == "acme_fraud_v2.ova"
    assert sorted(p.name for p in path.parent.iterdir()) == ["acme_fraud_v2.ova"]


def test_ova_is_ustar_with_ovf_first(ova):
    path, _digest, _extracted = ova
    with tarfile.open(path) as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == [
        "acme_fraud_v2.ovf",
        "acme_fraud_v2-disk1.vmdk",
        "acme_fraud_v2.mf",
    ]
    # Offset 0 is the .ovf itself: no pax or GNU long-name header precedes it.
    assert members[0].offset == 0
    raw = path.read_bytes()
    for member in members:
        header = raw[member.offset : member.offset + 512]
        assert header[257:265] == b"ustar\x0000", f"{member.name} is not a POSIX ustar header"
        assert member.isreg()


def test_manifest_digests_match_extracted_files(ova):
    path, digest, extracted = ova
    label = {"sha256": "SHA256", "sha1": "SHA1"}[digest]
    lines = (extracted / "acme_fraud_v2.mf").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        match = re.fullmatch(rf"{label}\(([^)]+)\)= ([0-9a-f]+)", line)
        assert match, line
        member, hexdigest = match.groups()
        expected = hashlib.new(digest, (extracted / member).read_bytes()).hexdigest()
        assert hexdigest == expected
    assert {line.split("(")[1].split(")")[0] for line in lines} == {
        "acme_fraud_v2.ovf",
        "acme_fraud_v2-disk1.vmdk",
    }


# The manifest digest decides the OVF version: SHA1 with OVF 1.x, SHA256 with OVF 2.x.
OVF_NAMESPACE = {
    "sha1": "http://schemas.dmtf.org/ovf/envelope/1",
    "sha256": "http://schemas.dmtf.org/ovf/envelope/2",
}


def test_ovf_descriptor_describes_the_machine(ova):
    _path, digest, extracted = ova
    root = ET.parse(extracted / "acme_fraud_v2.ovf").getroot()
    ns = {**NS, "ovf": OVF_NAMESPACE[digest]}
    ovf, rasd = ns["ovf"], ns["rasd"]
    assert root.tag == f"{{{ovf}}}Envelope"

    file_ref = root.find("ovf:References/ovf:File", ns)
    vmdk = extracted / "acme_fraud_v2-disk1.vmdk"
    assert file_ref.get(f"{{{ovf}}}href") == vmdk.name
    assert int(file_ref.get(f"{{{ovf}}}size")) == vmdk.stat().st_size

    disk = root.find("ovf:DiskSection/ovf:Disk", ns)
    assert int(disk.get(f"{{{ovf}}}capacity")) == DISK_BYTES
    assert disk.get(f"{{{ovf}}}format").endswith("vmdk.html#streamOptimized")
    assert 0 < int(disk.get(f"{{{ovf}}}populatedSize")) <= DISK_BYTES

    assert root.find("ovf:NetworkSection/ovf:Network", ns).get(f"{{{ovf}}}name") == "VM Network"

    system = root.find("ovf:VirtualSystem", ns)
    os_section = system.find("ovf:OperatingSystemSection", ns)
    assert os_section.get(f"{{{ovf}}}id") == "96"
    assert os_section.get(f"{{{ns['vmw']}}}osType") == "debian12_64Guest"
    assert system.findtext("ovf:AnnotationSection/ovf:Annotation", namespaces=ns) == DESCRIPTION
    assert system.findtext("ovf:ProductSection/ovf:Product", namespaces=ns) == "acme_fraud_v2"

    hardware = system.find("ovf:VirtualHardwareSection", ns)
    assert hardware.findtext("ovf:System/vssd:VirtualSystemType", namespaces=ns) == "vmx-13"
    items = {}
    for item in hardware.findall("ovf:Item", ns):
        items.setdefault(item.findtext(f"{{{rasd}}}ResourceType"), []).append(item)

    def value(resource_type: str, field: str) -> str:
        (item,) = items[resource_type]
        return item.findtext(f"{{{rasd}}}{field}")

    assert value("3", "VirtualQuantity") == "3"
    assert value("4", "VirtualQuantity") == "6144"
    assert value("4", "AllocationUnits") == "byte * 2^20"
    assert value("6", "ResourceSubType") == "lsilogic"
    assert "5" in items  # IDE controller
    assert value("17", "Parent") == value("6", "InstanceID")
    assert value("17", "HostResource") == "ovf:/disk/vmdisk1"
    assert value("10", "ResourceSubType") == "E1000"
    assert value("10", "Connection") == "VM Network"
    instance_ids = [i.findtext(f"{{{rasd}}}InstanceID") for group in items.values() for i in group]
    assert len(instance_ids) == len(set(instance_ids))


def test_vmdk_is_stream_optimized_and_holds_the_same_data(ova, source, tmp_path):
    _path, _digest, extracted = ova
    vmdk = extracted / "acme_fraud_v2-disk1.vmdk"
    info = qemu_img_info(vmdk)
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["virtual-size"] == DISK_BYTES
    back = tmp_path / "back.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(vmdk), str(back)], check=True
    )
    assert filecmp.cmp(back, source[1], shallow=False)


def test_ubuntu_guest_and_no_description(source, tmp_path):
    hardware = VirtualHardware(name="plain", cpus=1, memory_mib=512, disk_gib=1, os_type="ubuntu")
    ova = export_ova(source[0], hardware, tmp_path, log=quiet)
    with tarfile.open(ova) as archive:
        root = ET.fromstring(archive.extractfile("plain.ovf").read())
    os_section = root.find("ovf:VirtualSystem/ovf:OperatingSystemSection", NS)
    assert os_section.get(f"{{{NS['ovf']}}}id") == "94"
    assert os_section.get(f"{{{NS['vmw']}}}osType") == "ubuntu64Guest"
    assert root.find("ovf:VirtualSystem/ovf:AnnotationSection", NS) is None


def test_export_logs_one_line_per_step(source, tmp_path):
    lines = []
    export_ova(source[0], HARDWARE, tmp_path, log=lines.append)
    assert len(lines) >= 4
    assert all("\n" not in line and line.startswith("export: ") for line in lines)


# COT takes the manifest's digest from the OVF version (1.x: SHA1), so it reports each entry of
# a signed OVA's SHA256 manifest (OVF 1.0, as ovftool writes it) as a SHA1 mismatch.
_COT_SHA1_OF_A_SHA256_ENTRY = re.compile(
    r"(\x1b\[[0-9;]*m)*ERROR\s*:(\x1b\[[0-9;]*m)* The sha1 checksum for file '[^']+' is "
    r"expected to be:\n[0-9a-f]{64}\nbut is actually:\n[0-9a-f]{40}\n"
    r"This file may have been tampered with!\n"
)


def cot_info(path: Path, sha256_manifest: bool = False) -> subprocess.CompletedProcess:
    """`cot -f info` on an OVA or OVF, asserting that it found nothing to complain about. With
    `sha256_manifest` (a signed OVA) COT's misreading of its SHA256 entries as SHA1 is dropped
    first; factory verify checks those digests."""
    cot = shutil.which("cot") or shutil.which("cot", path=str(Path(sys.executable).parent))
    if cot is None:
        pytest.skip("COT (pip install cot) is not installed; cannot run the third-party OVF check")
    result = subprocess.run([cot, "-f", "info", str(path)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    if sha256_manifest:
        output, misread = _COT_SHA1_OF_A_SHA256_ENTRY.subn("", output)
        assert misread, output  # COT learnt SHA256 manifests in OVF 1.x: drop this branch
    assert result.returncode == 0, output
    # COT reports a digest mismatch or a bad disk as an ERROR or WARNING line but exits 0.
    assert not re.search(r"ERROR|WARNING|tampered", output), output
    return result


@pytest.mark.parametrize("digest", ["sha1", "sha256", None])
def test_cot_accepts_every_ova_flavour(source, tmp_path, digest):
    options = {"digest": digest} if digest else {}  # None: the default
    ova = export_ova(source[0], HARDWARE, tmp_path, log=quiet, **options)
    result = cot_info(ova)
    assert "E1000" in result.stdout and "lsilogic" in result.stdout
    # The default configuration: 3 CPUs, 6 GiB of memory, 1 NIC.
    assert re.search(r"\(default\)\s+3\s+6 GiB\s+1\s", result.stdout), result.stdout


def test_export_qcow2_is_compressed_copy(source, tmp_path):
    out = export_qcow2(source[0], tmp_path, "acme_fraud_v2", log=quiet)
    assert out == tmp_path / "acme_fraud_v2.qcow2"
    assert qemu_img_info(out)["format"] == "qcow2"
    subprocess.run(["qemu-img", "compare", str(source[1]), str(out)], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme_fraud_v2.qcow2"]


def test_missing_disk_leaves_nothing_and_raises(tmp_path):
    out_dir = tmp_path / "out"
    with pytest.raises(FactoryError, match="does not exist"):
        export_ova(tmp_path / "nope.qcow2", HARDWARE, out_dir, log=quiet)
    with pytest.raises(FactoryError, match="does not exist"):
        export_qcow2(tmp_path / "nope.qcow2", out_dir, "x")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_damaged_qcow2_is_not_exported_as_raw(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\x00" * 508)  # qcow2 magic, version 0: qemu-img says raw
    out_dir = tmp_path / "out"
    with pytest.raises(FactoryError, match="not a qcow2 image"):
        export_ova(bad, HARDWARE, out_dir, log=quiet)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_truncated_qcow2_is_rejected(tmp_path):
    whole = tmp_path / "whole.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(whole), "64M"], check=True)
    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(whole.read_bytes()[:200])  # header intact, tables missing
    out_dir = tmp_path / "out"
    with pytest.raises(FactoryError, match="damaged"):
        export_ova(truncated, HARDWARE, out_dir, log=quiet)
    with pytest.raises(FactoryError, match="damaged"):
        export_qcow2(truncated, out_dir, "x", log=quiet)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_tool_failure_midway_raises_tool_error_and_leaves_nothing(tmp_path):
    # Damage inside a compressed cluster passes `qemu-img check` but makes convert fail.
    raw = tmp_path / "text.raw"
    raw.write_bytes(b"hello world " * 6000)
    os.truncate(raw, 2**20)
    damaged = tmp_path / "damaged.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(damaged)],
        check=True,
    )
    content = damaged.read_bytes()
    end = len(content.rstrip(b"\0"))
    damaged.write_bytes(content[: end - 200] + b"\xff" * 200 + content[end:])
    out_dir = tmp_path / "out"
    with pytest.raises(ToolError, match="converting .* to VMDK failed"):
        export_ova(damaged, HARDWARE, out_dir, log=quiet)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, FactoryError])
@pytest.mark.parametrize("step", ["OVF", "manifest", "packing"])
def test_interrupted_export_leaves_nothing(source, tmp_path, interrupt, step):
    def log(line):
        if step in line:
            raise interrupt("stop")

    with pytest.raises(interrupt):
        export_ova(source[0], HARDWARE, tmp_path, log=log)
    assert list(tmp_path.iterdir()) == []


def test_unknown_digest_is_rejected(source, tmp_path):
    with pytest.raises(FactoryError, match="sha256"):
        export_ova(source[0], HARDWARE, tmp_path, digest="md5", log=quiet)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "acme fraud"},
        {"name": "../x"},
        {"name": ""},
        {"cpus": 0},
        {"memory_mib": "4096"},
        {"os_type": "windows"},
        {"description": "bell\x07"},
        {"description": None},
        {"name": "x" * 81},
    ],
)
def test_invalid_hardware_is_rejected(changes):
    values = {"name": "ok", "cpus": 1, "memory_mib": 512, "disk_gib": 1, **changes}
    with pytest.raises(FactoryError):
        VirtualHardware(**values)


def test_checksums_verify_with_sha256sum(tmp_path):
    (tmp_path / "a.ova").write_bytes(b"a" * 1000)
    (tmp_path / "b.qcow2").write_bytes(b"b")
    sums = write_checksums(tmp_path, [tmp_path / "a.ova", tmp_path / "b.qcow2"])
    assert sums == tmp_path / "SHA256SUMS"
    assert sums.read_text().splitlines()[0] == (hashlib.sha256(b"a" * 1000).hexdigest() + "  a.ova")
    subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=tmp_path, check=True)


def test_checksums_reject_artifacts_outside_out_dir(tmp_path):
    outside = tmp_path / "elsewhere.ova"
    outside.write_bytes(b"x")
    (tmp_path / "out").mkdir()
    with pytest.raises(FactoryError, match="not inside"):
        write_checksums(tmp_path / "out", [outside])


def test_build_manifest_records_the_build(tmp_path):
    artifact = tmp_path / "acme.ova"
    artifact.write_bytes(b"ova bytes")
    started = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
    path = write_build_manifest(
        tmp_path,
        profile_sha256="ab" * 32,
        artifacts=[artifact],
        tool_versions={"packer": "1.6.6", "qemu-img": "7.2.22"},
        started=started,
        finished=started + timedelta(minutes=3, seconds=2.5),
        stages=[{"name": "packer", "seconds": 120.5, "log": "build.log"}],
        extra={"client": "acme"},
    )
    assert path == tmp_path / "manifest.json"
    record = json.loads(path.read_text())
    assert record["factory_version"] == __version__
    assert record["profile_sha256"] == "ab" * 32
    assert record["artifacts"] == [
        {"name": "acme.ova", "sha256": hashlib.sha256(b"ova bytes").hexdigest(), "size": 9}
    ]
    assert record["tool_versions"] == {"packer": "1.6.6", "qemu-img": "7.2.22"}
    assert record["build"] == {
        "started": "2026-11-25T10:00:00Z",
        "finished": "2026-11-25T10:03:02Z",
        "duration_s": 182.5,
    }
    assert record["stages"] == [{"name": "packer", "seconds": 120.5, "log": "build.log"}]
    assert record["extra"] == {"client": "acme"}
    git = record["git"]
    assert git is None or (
        re.fullmatch(r"[0-9a-f]{40}", git["revision"]) and isinstance(git["dirty"], bool)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme.ova", "manifest.json"]


def test_build_manifest_rejects_time_travel(tmp_path):
    now = datetime.now(UTC)
    with pytest.raises(FactoryError, match="before it started"):
        write_build_manifest(
            tmp_path,
            profile_sha256="0" * 64,
            artifacts=[],
            tool_versions={},
            started=now,
            finished=now - timedelta(seconds=1),
        )


# --- Vagrant boxes (factory/boxes.py); tests/test_vagrant.py boots one for real ---------------

BOX_SPEC = BoxSpec(box_name="acme/fraud", version="2", hardware=HARDWARE, jupyter_port=8888)


def test_libvirt_box_holds_the_unchanged_disk_and_a_seed(source, tmp_path):
    box = write_libvirt_box(source[0], BOX_SPEC, tmp_path, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme_fraud_v2-libvirt.box"]
    extracted = tmp_path / "x"
    with tarfile.open(box) as archive:
        assert archive.getnames() == ["metadata.json", "Vagrantfile", "box.img", "seed.img"]
        archive.extractall(extracted, filter="data")
    assert filecmp.cmp(extracted / "box.img", source[0], shallow=False)
    metadata = json.loads((extracted / "metadata.json").read_text())
    assert metadata["provider"] == "libvirt" and metadata["virtual_size"] == 1
    assert qemu_img_info(extracted / "seed.img")["format"] == "qcow2"
    seed = (extracted / "seed.img").read_bytes()
    assert b"CIDATA" in seed.upper() and VAGRANT_INSECURE_KEY.split()[1].encode() in seed
    vagrantfile = (extracted / "Vagrantfile").read_text()
    assert "lv.cpus = 3" in vagrantfile and "lv.memory = 6144" in vagrantfile
    assert 'guest: 8888, guest_ip: "127.0.0.1"' in vagrantfile
    assert "disabled: true" in vagrantfile
    if shutil.which("ruby"):
        subprocess.run(["ruby", "-c", str(extracted / "Vagrantfile")], check=True)


# Evaluates a box's Vagrantfile with a stand-in for Vagrant's config: prints what the libvirt
# provider was set to, as JSON.
_LIBVIRT_SETTINGS = r"""
require "json"
class Recorder
  attr_reader :settings
  def initialize; @settings = {"qemuargs" => []}; end
  def qemuargs(options); @settings["qemuargs"] << options[:value]; end
  def method_missing(name, *args)
    key = name.to_s.chomp("=")
    name.to_s.end_with?("=") ? @settings[key] = args[0] : @settings[key]
  end
  def respond_to_missing?(*) = true
end
class Config
  def initialize(libvirt); @libvirt = libvirt; end
  def vm = self
  def ssh = self
  def provider(name); yield @libvirt if name == :libvirt; end
  def method_missing(*) = nil
  def respond_to_missing?(*) = true
end
module Vagrant
  def self.configure(_version)
    libvirt = Recorder.new
    yield Config.new(libvirt)
    puts JSON.generate(libvirt.settings)
  end
end
load ARGV[0]
"""


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby missing: `make setup`")
@pytest.mark.parametrize(
    ("baseline", "driver", "model", "qemuargs"),
    [
        ("x86-64-v2", "kvm", "Nehalem", []),
        ("x86-64-v2", "qemu", "Nehalem", ["-cpu", "Nehalem,vendor=AuthenticAMD"]),
        ("x86-64-v3", "kvm", "Haswell-noTSX", []),
        # Plain emulation holds at v2: QEMU's AVX2 emulation crashes NumPy.
        ("x86-64-v3", "qemu", "Nehalem", ["-cpu", "Nehalem,vendor=AuthenticAMD"]),
    ],
)
def test_libvirt_box_boots_at_the_profiles_cpu_level(tmp_path, baseline, driver, model, qemuargs):
    spec = dataclasses.replace(BOX_SPEC, cpu_baseline=baseline)
    vagrantfile = tmp_path / "Vagrantfile"
    vagrantfile.write_text(render_box_vagrantfile(spec, "libvirt"))
    evaluated = subprocess.run(
        ["ruby", "-e", _LIBVIRT_SETTINGS, str(vagrantfile)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "FACTORY_LIBVIRT_DRIVER": driver},
    )  # fmt: skip
    settings = json.loads(evaluated.stdout)
    assert settings["driver"] == driver
    assert (settings["cpu_mode"], settings["cpu_model"]) == ("custom", model)
    assert settings["cpu_fallback"] == "forbid"
    assert settings["qemuargs"] == qemuargs


def test_virtualbox_box_is_an_ovf_with_the_disk_and_the_seed(source, tmp_path):
    box = write_virtualbox_box(source[0], BOX_SPEC, tmp_path, log=quiet)
    extracted = tmp_path / "x"
    with tarfile.open(box) as archive:
        archive.extractall(extracted, filter="data")
    assert json.loads((extracted / "metadata.json").read_text()) == {"provider": "virtualbox"}
    root = ET.parse(extracted / "box.ovf").getroot()
    hrefs = [f.get(f"{{{NS['ovf']}}}href") for f in root.iterfind("ovf:References/ovf:File", NS)]
    assert hrefs == ["box-disk001.vmdk", "box-disk002.vmdk"]
    back = tmp_path / "back.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(extracted / "box-disk001.vmdk"), str(back)],
        check=True,
    )
    assert filecmp.cmp(back, source[1], shallow=False)
    assert "vb.cpus = 3" in (extracted / "Vagrantfile").read_text()
    result = cot_info(extracted / "box.ovf")
    assert "box-disk002.vmdk" in result.stdout


def test_catalog_keeps_every_version_and_replaces_a_rebuilt_box(tmp_path):
    box = tmp_path / "acme_fraud_v2-libvirt.box"
    box.write_bytes(b"v2")
    catalog = tmp_path / "acme_fraud.json"
    update_catalog(catalog, BOX_SPEC, {"libvirt": box}, "https://boxes.example.com/acme/")
    spec_v10 = BoxSpec("acme/fraud", "10", HARDWARE, None)
    update_catalog(catalog, spec_v10, {"libvirt": box}, "file:///srv/boxes/")
    box.write_bytes(b"v2, rebuilt")
    update_catalog(catalog, BOX_SPEC, {"virtualbox": box, "libvirt": box}, "https://b.example/")
    data = json.loads(catalog.read_text())
    assert data["name"] == "acme/fraud"
    assert [v["version"] for v in data["versions"]] == ["2", "10"]
    v2 = data["versions"][0]["providers"]
    assert [p["name"] for p in v2] == ["libvirt", "virtualbox"]
    assert v2[0] == {
        "name": "libvirt",
        "url": "https://b.example/acme_fraud_v2-libvirt.box",
        "checksum_type": "sha256",
        "checksum": hashlib.sha256(b"v2, rebuilt").hexdigest(),
    }
    assert (
        data["versions"][1]["providers"][0]["url"] == "file:///srv/boxes/acme_fraud_v2-libvirt.box"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not a Vagrant box catalog"),
        ('{"name": "other/box", "versions": []}', "catalog of 'other/box'"),
        ('{"name": "acme/fraud", "versions": [{"version": "2"}, {"version": "2"}]}', "twice"),
    ],
)
def test_a_catalog_that_is_not_ours_is_refused(tmp_path, content, message):
    catalog = tmp_path / "acme_fraud.json"
    catalog.write_text(content)
    box = tmp_path / "b.box"
    box.write_bytes(b"x")
    with pytest.raises(FactoryError, match=message):
        update_catalog(catalog, BOX_SPEC, {"libvirt": box}, "file:///b/")
    assert catalog.read_text() == content


@pytest.mark.parametrize("step", ["libvirt box", "VirtualBox box"])
def test_interrupted_box_export_leaves_nothing(source, tmp_path, step):
    def log(line):
        if step in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_boxes(
            source[0], BOX_SPEC, ["vagrant-libvirt", "vagrant-virtualbox"], tmp_path, log=log
        )
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == (
        [tmp_path / "acme_fraud_v2-libvirt.box"] if step == "VirtualBox box" else []
    )
    assert not (tmp_path / "acme_fraud.json").exists()


@pytest.mark.parametrize(
    "args, option",
    [
        (["--format", "ova,zip"], "--format"),
        (["--format", ","], "--format"),
        (["--format", "vagrant-libvirt", "--box-url", "boxes.example.com"], "--box-url"),
        (["--ova-digest", "md5"], "--ova-digest"),
    ],
)
def test_export_command_rejects_a_bad_option_in_one_line(tmp_path, args, option):
    from tests.conftest import run_factory

    result = run_factory("export", str(tmp_path), *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(option in line for line in lines), result.stderr
    if option != "--ova-digest":  # click's own usage error has two lines
        assert len(lines) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_build_rejects_a_bad_format_before_building(tmp_path):
    from tests.conftest import run_factory

    result = run_factory("build", str(tmp_path / "absent.yaml"), "--format", "ova,zip")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --format 'ova,zip': unknown format 'zip'; use a comma-separated list of: "
        "ova, vagrant-libvirt, vagrant-virtualbox, oci"
    ]
