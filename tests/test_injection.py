"""Property test: arbitrary text in the profile's free-text fields either is refused by the
schema or reaches each target language (HCL, shell, cloud-init YAML, OVF XML) unchanged."""

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import hcl2
import yaml
from hcl2 import SerializationOptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from factory.escape import cloud_config
from factory.export import VirtualHardware, _OvfDisk, render_ovf
from factory.keys import KeyPair
from factory.profile import LoadedProfile, Profile, load_profile
from factory.render import BuildInputs, render_pkrvars, render_settings
from tests.conftest import DEMO_PROFILE

EXAMPLES = 1000
DEMO = load_profile(DEMO_PROFILE)
NASTY = st.text(max_size=60) | st.sampled_from(
    [
        '"\n',
        "${var.x}",
        "%{ if true }x%{ endif }",
        "$(reboot)",
        "`id`",
        "\\",
        "'\"'",
        "a\0b",
        '" \n injected = "1',
        "$${x}",
        "\\${x}",
        "\u2028",
        "\x85",
        "']]>",
        "<!--",
        "&amp;",
    ]
)
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def profile_with(field: str, value: str) -> LoadedProfile | None:
    data = DEMO.profile.model_dump()
    data[field] = value
    try:
        profile = Profile.model_validate(data)
    except ValidationError:
        return None  # refused at the schema, which is allowed
    return LoadedProfile(profile=profile, path=DEMO.path, sha256=DEMO.sha256)


INPUTS = BuildInputs(
    base_image="/b.qcow2",
    base_image_checksum="none",
    accelerator="tcg",
    output_directory="/o",
    console_log="/c",
    build_key=KeyPair(private_key_file=Path("/k"), public_key="ssh-ed25519 AAAA"),
)


@SETTINGS
@given(st.sampled_from(["description", "industry"]), NASTY)
def test_hcl_pkrvars(field, value):
    loaded = profile_with(field, value)
    if loaded is None:
        return
    parsed = hcl2.loads(
        render_pkrvars(loaded, INPUTS),
        serialization_options=SerializationOptions(strip_string_quotes=True),
    )
    assert parsed[field] == value


@SETTINGS
@given(st.sampled_from(["description", "industry"]), NASTY)
def test_shell_settings(field, value):
    loaded = profile_with(field, value)
    if loaded is None:
        return
    script = render_settings(loaded)
    assert subprocess.run(["bash", "-n"], input=script.encode()).returncode == 0
    variable = {"description": "FACTORY_DESCRIPTION", "industry": "FACTORY_INDUSTRY"}[field]
    result = subprocess.run(
        ["bash", "-c", script + f'printf %s "${variable}"'], capture_output=True
    )
    assert result.returncode == 0
    assert result.stdout.decode() == value


@SETTINGS
@given(NASTY)
def test_cloud_init_yaml(value):
    if "\0" in value:
        return
    assert yaml.safe_load(cloud_config({"fqdn": value}))["fqdn"] == value


@SETTINGS
@given(NASTY)
def test_ovf_xml(value):
    loaded = profile_with("description", value)
    if loaded is None:
        return
    hardware = VirtualHardware(
        name=loaded.name,
        cpus=2,
        memory_mib=2048,
        disk_gib=8,
        description=loaded.profile.description,
    )
    disk = _OvfDisk(file_name="d.vmdk", file_size=1, capacity=1 << 30, populated_size=1)
    root = ET.fromstring(render_ovf(hardware, disk).encode())
    texts = [e.text or "" for e in root.iter() if e.tag.endswith("}Annotation")]
    assert value in texts or (value.strip() == "" and texts == [""] * len(texts))
