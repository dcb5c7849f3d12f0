"""OVF descriptors against the DMTF OVF envelope schema (DSP8023), and against the rules of that
schema that importers enforce, for every flavour we write: the OVA (OVF 1.0 + SHA1, OVF 2.0 +
SHA256, signed: OVF 1.0 + SHA256 + certificate), the VirtualBox box's box.ovf, and the demo
delivery's OVA.

The DMTF OVF 1.1.1 schema and the CIM schemas it imports are read, never copied, from
$FACTORY_DMTF_SCHEMAS, else ../shared/schemas/dmtf-ovf-1.1.1 beside the checkout, else
/work/shared/schemas/dmtf-ovf-1.1.1 (docs/vagrant.md, 'The DMTF schema check'). Where they are
present the OVF 1.x descriptors are validated with lxml; the structural rules run always.
No OVF 2.x schema is at hand, so the OVF 2.0 flavour gets the structural rules only.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from factory.boxes import BoxSpec, write_virtualbox_box
from factory.delivery import full_version
from factory.export import VirtualHardware, export_ova, virtual_hardware
from factory.profile import load_profile
from factory.signing import Signer, generate_key, profile_signer, vendor
from tests.conftest import REPO
from tests.test_profile import GOOD

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed (Debian: qemu-utils)"
)

OVF1 = "http://schemas.dmtf.org/ovf/envelope/1"
OVF2 = "http://schemas.dmtf.org/ovf/envelope/2"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
SCHEMA_PLACES = [
    *([Path(os.environ["FACTORY_DMTF_SCHEMAS"])] if os.environ.get("FACTORY_DMTF_SCHEMAS") else []),
    REPO.parent / "shared" / "schemas" / "dmtf-ovf-1.1.1",
    Path("/work/shared/schemas/dmtf-ovf-1.1.1"),
]
ENVELOPE_XSD = "dsp8023_1.1.1.xsd"  # OVF 1.x; no OVF 2.x schema is at hand
SCHEMA_DIR = next((p for p in SCHEMA_PLACES if (p / ENVELOPE_XSD).is_file()), SCHEMA_PLACES[0])
# ProductSection's children, an xs:sequence in DSP8023.
PRODUCT_ORDER = ["Info", "Product", "Vendor", "Version", "FullVersion"]
HARDWARE = VirtualHardware(
    name="acme_fraud_v2", cpus=3, memory_mib=6144, disk_gib=1, description="Fraud <model> & co"
)


def quiet(*_args):
    pass


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def structure_errors(root: ET.Element) -> list[str]:
    """What DSP8023 and the CIM schemas would reject, checked without them: element order
    (xs:sequence), required attributes, and references that must resolve."""
    ns = root.tag[1:].split("}")[0]
    errors = []
    if ns not in (OVF1, OVF2) or local(root.tag) != "Envelope":
        return [f"root is {root.tag}, not an OVF Envelope"]

    def attr(element: ET.Element, name: str) -> str | None:
        return element.get(f"{{{ns}}}{name}")

    order = [local(child.tag) for child in root]
    if order[:1] != ["References"] or order[-1] not in ("VirtualSystem", "VirtualSystemCollection"):
        errors.append(f"Envelope children out of order: {order}")
    for section in root.iter():
        if local(section.tag).endswith("Section") and section.tag.startswith(f"{{{ns}}}"):
            if not len(section) or section[0].tag != f"{{{ns}}}Info":
                errors.append(f"{local(section.tag)} does not start with Info")
    files = {attr(f, "id"): attr(f, "href") for f in root.iterfind(f"{{{ns}}}References/*")}
    if None in files or None in files.values():
        errors.append("a File lacks ovf:id or ovf:href")
    disks = set()
    for disk in root.iterfind(f"{{{ns}}}DiskSection/{{{ns}}}Disk"):
        disks.add(attr(disk, "diskId"))
        if not (attr(disk, "capacity") or "").isdigit():
            errors.append(f"Disk {attr(disk, 'diskId')} has no numeric ovf:capacity")
        if attr(disk, "fileRef") not in files:
            errors.append(f"Disk {attr(disk, 'diskId')} refers to a missing file")
    networks = {attr(n, "name") for n in root.iterfind(f"{{{ns}}}NetworkSection/{{{ns}}}Network")}
    system = root.find(f"{{{ns}}}VirtualSystem")
    if system is None or not attr(system, "id"):
        return [*errors, "no VirtualSystem with an ovf:id"]
    if system[0].tag != f"{{{ns}}}Info":
        errors.append("VirtualSystem does not start with Info")
    product = [local(child.tag) for child in system.iterfind(f"{{{ns}}}ProductSection/*")]
    if product != sorted(
        product, key=lambda n: PRODUCT_ORDER.index(n) if n in PRODUCT_ORDER else 99
    ):
        errors.append(f"ProductSection children out of order: {product}")
    os_id = attr(system.find(f"{{{ns}}}OperatingSystemSection"), "id") or ""
    if not (os_id.isdigit() and int(os_id) <= 65535):
        errors.append(f"OperatingSystemSection ovf:id {os_id!r} is not an unsignedShort")
    hardware = system.find(f"{{{ns}}}VirtualHardwareSection")
    items = hardware.findall(f"{{{ns}}}Item")
    instance_ids = {item.findtext(f"{{{RASD}}}InstanceID") for item in items}
    for block, cim in [(hardware.find(f"{{{ns}}}System"), VSSD), *[(i, RASD) for i in items]]:
        names = [local(child.tag) for child in block]
        if any(not child.tag.startswith(f"{{{cim}}}") for child in block):
            errors.append(f"{names} holds elements outside {cim}")
        if names != sorted(names):  # the CIM schemas are one alphabetical xs:sequence
            errors.append(f"CIM elements out of order: {names}")
        if "InstanceID" not in names or "ElementName" not in names:
            errors.append(f"{names} lacks InstanceID or ElementName")
    for item in items:
        host = item.findtext(f"{{{RASD}}}HostResource")
        if host and host.removeprefix("ovf:/disk/") not in disks:
            errors.append(f"HostResource {host} names no disk")
        parent = item.findtext(f"{{{RASD}}}Parent")
        if parent and parent not in instance_ids:
            errors.append(f"Parent {parent} names no item")
        connection = item.findtext(f"{{{RASD}}}Connection")
        if connection and connection not in networks:
            errors.append(f"Connection {connection} names no network")
    if len(instance_ids) != len(items):
        errors.append("InstanceIDs repeat")
    return errors


def dmtf_schema():
    """The DMTF OVF 1.1.1 envelope schema, its imports resolved from SCHEMA_DIR."""
    from lxml import etree

    if not (SCHEMA_DIR / ENVELOPE_XSD).is_file():
        places = ", ".join(map(str, SCHEMA_PLACES))
        pytest.skip(
            f"DMTF schema {ENVELOPE_XSD} is in none of {places}; "
            "see docs/vagrant.md, 'The DMTF schema check'"
        )

    class ByFileName(etree.Resolver):
        # The schemas import each other by dmtf.org and w3.org URLs; never fetch them.
        def resolve(self, url, _public_id, context):
            candidate = SCHEMA_DIR / url.rsplit("/", 1)[-1]
            return self.resolve_filename(str(candidate), context) if candidate.is_file() else None

    parser = etree.XMLParser(no_network=True)
    parser.resolvers.add(ByFileName())
    return etree.XMLSchema(etree.parse(str(SCHEMA_DIR / ENVELOPE_XSD), parser))


def check_descriptor(text: bytes) -> None:
    root = ET.fromstring(text)
    assert structure_errors(root) == []
    assert root.tag == f"{{{OVF1}}}Envelope", "only OVF 1.x has a schema at hand"
    from lxml import etree

    schema = dmtf_schema()
    document = etree.fromstring(text)
    assert schema.validate(document), "\n".join(str(e) for e in schema.error_log)


@pytest.fixture(scope="module")
def signed_from_a_profile(tmp_path_factory) -> tuple[VirtualHardware, Signer]:
    """The virtual hardware and signer of a profile with signing.key, as a build makes them."""
    folder = tmp_path_factory.mktemp("profile")
    generate_key(folder / "keys" / "team.key", "Acme <delivery> & co")
    profile = folder / "acme.yaml"
    profile.write_text(GOOD + "description: Fraud <model> & co\nsigning: {key: keys/team.key}\n")
    loaded = load_profile(profile)
    signer = profile_signer(loaded)
    revision = {"revision": "0123456789abcdef0123456789abcdef01234567", "dirty": True}
    return virtual_hardware(loaded, vendor(loaded, signer), full_version(revision)), signer


def ovf_of(ova: Path) -> bytes:
    with tarfile.open(ova) as archive:
        (member,) = [m for m in archive.getmembers() if m.name.endswith(".ovf")]
        return archive.extractfile(member).read()


@pytest.mark.parametrize("digest, namespace", [("sha1", OVF1), ("sha256", OVF2)])
def test_structure_of_each_ova_flavour(disk, tmp_path, digest, namespace):
    text = ovf_of(export_ova(disk, HARDWARE, tmp_path, digest=digest, log=quiet))
    root = ET.fromstring(text)
    assert root.tag == f"{{{namespace}}}Envelope"
    assert structure_errors(root) == []


def test_structure_of_the_virtualbox_box(disk, tmp_path):
    spec = BoxSpec("acme/fraud", "2", HARDWARE, 8888)
    box = write_virtualbox_box(disk, spec, tmp_path, log=quiet)
    with tarfile.open(box) as archive:
        text = archive.extractfile("box.ovf").read()
    assert structure_errors(ET.fromstring(text)) == []


@pytest.mark.parametrize(
    "damage",
    [
        # The rules can fail: each of these is a descriptor that DSP8023 or CIM rejects.
        lambda t: t.replace(b"<rasd:AllocationUnits>", b"<rasd:Zzz/><rasd:AllocationUnits>", 1),
        lambda t: re.sub(rb"<Info>Virtual disk information</Info>", b"", t),
        lambda t: t.replace(b"ovf:/disk/vmdisk1", b"ovf:/disk/nowhere"),
        lambda t: re.sub(rb'ovf:id="96"', b'ovf:id="debian"', t),
        lambda t: t.replace(b"<rasd:Parent>3</rasd:Parent>", b"<rasd:Parent>42</rasd:Parent>"),
    ],
)
def test_structure_rules_catch_a_broken_descriptor(disk, tmp_path, damage):
    text = ovf_of(export_ova(disk, HARDWARE, tmp_path, log=quiet))
    broken = damage(text)
    assert broken != text
    assert structure_errors(ET.fromstring(broken)) != []


def test_structure_of_a_signed_ova_from_a_profile(disk, tmp_path, signed_from_a_profile):
    hardware, signer = signed_from_a_profile
    root = ET.fromstring(ovf_of(export_ova(disk, hardware, tmp_path, log=quiet, signer=signer)))
    assert root.tag == f"{{{OVF1}}}Envelope"
    assert structure_errors(root) == []
    product = root.find(f"{{{OVF1}}}VirtualSystem/{{{OVF1}}}ProductSection")
    assert [local(child.tag) for child in product] == PRODUCT_ORDER
    assert product.findtext(f"{{{OVF1}}}Vendor") == "Acme <delivery> & co"


def test_the_product_rule_catches_a_section_out_of_order(disk, tmp_path, signed_from_a_profile):
    hardware, signer = signed_from_a_profile
    text = ovf_of(export_ova(disk, hardware, tmp_path, log=quiet, signer=signer))
    swapped = re.sub(rb"(<Vendor>.*?</Vendor>)(\s*)(<Version>.*?</Version>)", rb"\3\2\1", text)
    assert swapped != text
    assert structure_errors(ET.fromstring(swapped)) != []


def test_the_unsigned_ova_validates_against_the_dmtf_schema(disk, tmp_path):
    check_descriptor(ovf_of(export_ova(disk, HARDWARE, tmp_path, digest="sha1", log=quiet)))


def test_a_signed_ova_from_a_profile_validates_against_the_dmtf_schema(
    disk, tmp_path, signed_from_a_profile
):
    hardware, signer = signed_from_a_profile
    check_descriptor(ovf_of(export_ova(disk, hardware, tmp_path, log=quiet, signer=signer)))


def test_the_dmtf_schema_refuses_a_product_section_out_of_order(
    disk, tmp_path, signed_from_a_profile
):
    """The schema step can fail, as the structural rules can."""
    from lxml import etree

    hardware, signer = signed_from_a_profile
    text = ovf_of(export_ova(disk, hardware, tmp_path, log=quiet, signer=signer))
    swapped = re.sub(rb"(<Vendor>.*?</Vendor>)(\s*)(<Version>.*?</Version>)", rb"\3\2\1", text)
    assert not dmtf_schema().validate(etree.fromstring(swapped))


@pytest.mark.e2e
def test_the_demo_delivery_ova_is_well_formed_and_cot_is_clean(demo_delivery):
    from tests.test_export import cot_info

    ova = demo_delivery / "demo_hello_v1.ova"
    assert structure_errors(ET.fromstring(ovf_of(ova))) == []
    cot_info(ova, sha256_manifest=True)  # the demo is signed


@pytest.mark.e2e
def test_the_demo_delivery_ova_validates_against_the_dmtf_schema(demo_delivery):
    check_descriptor(ovf_of(demo_delivery / "demo_hello_v1.ova"))
