"""The SBOM from an image's own records: dpkg's status file, conda-meta, and the dist-info
`pip list` reads; written as CycloneDX and read back; compared with what a machine reports.
The real image is checked in both directions by the demo's validation (test_e2e)."""

import json
from pathlib import Path

from factory import sbom
from factory.validate.inventory import describe, differences

STATUS = """Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.15-2+b2

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
"""
COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: 1987-2022 Free Software Foundation, Inc.
License: GPL-3+
"""


def fake_image(root: Path) -> Path:
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(STATUS)
    (root / "usr/share/doc/bash").mkdir(parents=True)
    (root / "usr/share/doc/bash/copyright").write_text(COPYRIGHT)
    env = root / "opt/conda/envs/demo"
    (env / "conda-meta").mkdir(parents=True)
    record = {"name": "six", "version": "1.17.0", "build": "py_0", "subdir": "noarch",
              "license": "MIT", "md5": "0" * 32, "sha256": "1" * 64}  # fmt: skip
    (env / "conda-meta" / "six-1.17.0-py_0.json").write_text(json.dumps(record))
    site = env / "lib/python3.11/site-packages"
    for name, version, licence in (("pip", "26.3", "MIT"), ("Tabulate", "0.10.0", "")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        extra = f"License-Expression: {licence}\n" if licence else ""
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n{extra}"
        )
    return root


def test_inventory_reads_each_record_and_skips_removed_packages(tmp_path):
    packages = sbom.read_inventory(fake_image(tmp_path / "root"))
    found = {p.identity for p in packages}
    assert found == {
        ("deb", "", "bash", "5.2.15-2+b2"),
        ("conda", "/opt/conda/envs/demo", "six", "1.17.0"),
        ("pypi", "/opt/conda/envs/demo", "pip", "26.3"),
        ("pypi", "/opt/conda/envs/demo", "tabulate", "0.10.0"),
    }
    bash = next(p for p in packages if p.name == "bash")
    assert bash.licenses == ("GPL-3+",)


def test_cyclonedx_round_trip_keeps_every_package(tmp_path):
    packages = sbom.read_inventory(fake_image(tmp_path / "root"))
    path = tmp_path / sbom.SBOM_FILE
    sbom.write_sbom(packages, "demo_hello_v1", "v1", path)
    document = json.loads(path.read_text())
    assert document["bomFormat"] == "CycloneDX" and document["specVersion"] == "1.5"
    assert document["metadata"]["component"]["name"] == "demo_hello_v1"
    purls = sorted(c["purl"] for c in document["components"])
    assert "pkg:deb/debian/bash@5.2.15-2%2Bb2?arch=amd64" in purls
    assert "pkg:conda/six@1.17.0?build=py_0&subdir=noarch" in purls
    six = next(c for c in document["components"] if c["name"] == "six")
    assert {h["alg"] for h in six["hashes"]} == {"MD5", "SHA-256"}
    assert six["licenses"] == [{"license": {"id": "MIT"}}]
    back = {p.identity for p in sbom.read_sbom(path)}
    assert back == {p.identity for p in packages}


def test_differences_name_what_was_added_removed_and_changed(tmp_path):
    listed = sbom.read_inventory(fake_image(tmp_path / "root"))
    found = [p for p in listed if p.name != "six"]
    found = [sbom.Package("deb", "bash", "5.3") if p.name == "bash" else p for p in found]
    found.append(sbom.Package("deb", "netcat", "1.0"))
    diff = differences(listed, found)
    assert diff == {
        "added": ["deb:netcat 1.0"],
        "removed": ["conda:six (/opt/conda/envs/demo) 1.17.0"],
        "changed": ["deb:bash 5.2.15-2+b2 -> 5.3"],
    }
    assert describe(found, diff).startswith("added: deb:netcat 1.0; removed: conda:six")
    assert differences(listed, listed) == {"added": [], "removed": [], "changed": []}
    # pip names compare as pip does: case, '-', '_' and '.' do not matter.
    renamed = [sbom.Package("pypi", "TABULATE", "0.10.0", "/opt/conda/envs/demo")]
    tab = [p for p in listed if p.name == "Tabulate"]
    assert differences(tab, renamed) == {"added": [], "removed": [], "changed": []}
