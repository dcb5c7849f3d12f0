"""The delivery's inventory: every Debian, conda and pip package in the image, read from the
image's own records (dpkg's status file, each prefix's conda-meta, each environment's
dist-info), and written as a CycloneDX SBOM. The validator reads the same three records in the
booted image and compares them with the SBOM in both directions."""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath

from cyclonedx.contrib.license.exceptions import InvalidSpdxLicenseException
from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot5
from debian.copyright import Copyright, NotMachineReadableError
from debian.deb822 import Deb822
from packageurl import PackageURL

from factory import image_layout
from factory.files import write_text_atomically

SBOM_FILE = "sbom.cdx.json"
DEB, CONDA, PIP = "deb", "conda", "pypi"
PROPERTY_PREFIX = "factory:prefix"


@dataclass(frozen=True)
class Package:
    """One installed package. `prefix` is the conda prefix it lives in ("" for Debian's)."""

    kind: str
    name: str
    version: str
    prefix: str = ""
    arch: str = ""
    build: str = ""
    licenses: tuple[str, ...] = ()
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> tuple[str, str, str, str]:
        """What must match between the SBOM and the image: kind, prefix, name, version."""
        return (self.kind, self.prefix, normalized(self.kind, self.name), self.version)


def normalized(kind: str, name: str) -> str:
    """pip compares names by PEP 503; conda and dpkg names are already canonical."""
    return re.sub(r"[-_.]+", "-", name).lower() if kind == PIP else name


def read_inventory(root: Path) -> list[Package]:
    """Every package in the image mounted at `root`."""
    return [*_debian(root), *_conda(root), *_pip(root)]


def conda_prefixes(root: Path) -> list[PurePosixPath]:
    """The conda prefixes in the image: the base one when it is an environment, then each env."""
    base = image_layout.CONDA_PREFIX
    found = [base] if (root / base.relative_to("/") / "conda-meta").is_dir() else []
    envs = root / image_layout.CONDA_ENVS.relative_to("/")
    if envs.is_dir():
        found += [image_layout.CONDA_ENVS / p.name for p in sorted(envs.iterdir())
                  if (p / "conda-meta").is_dir()]  # fmt: skip
    return found


def _debian(root: Path) -> list[Package]:
    packages = []
    with open(root / "var/lib/dpkg/status", encoding="utf-8") as status:
        for stanza in Deb822.iter_paragraphs(status):
            if stanza.get("Status", "").split()[-1:] != ["installed"]:
                continue
            name = stanza["Package"]
            packages.append(
                Package(DEB, name, stanza["Version"], arch=stanza.get("Architecture", ""),
                        licenses=_debian_licenses(root / "usr/share/doc" / name / "copyright"))
            )  # fmt: skip
    return packages


def _debian_licenses(path: Path) -> tuple[str, ...]:
    """The licences a machine-readable (DEP-5) copyright file names; () for any other."""
    logging.getLogger("debian.copyright").setLevel(logging.ERROR)  # it notes each odd header
    try:
        with open(path, encoding="utf-8", errors="replace") as text:
            parsed = Copyright(text, strict=False)
    except (OSError, NotMachineReadableError, ValueError):
        return ()
    names = {p.license.synopsis for p in parsed.all_files_paragraphs() if p.license}
    return tuple(sorted(n for n in names if n))


def _conda(root: Path) -> list[Package]:
    packages = []
    for prefix in conda_prefixes(root):
        for record in sorted((root / prefix.relative_to("/") / "conda-meta").glob("*.json")):
            meta = json.loads(record.read_text())
            hashes = {k: meta[k] for k in ("md5", "sha256") if meta.get(k)}
            licenses = (meta["license"],) if meta.get("license") else ()
            packages.append(
                Package(CONDA, meta["name"], meta["version"], str(prefix),
                        arch=meta.get("subdir", ""), build=meta.get("build", ""),
                        licenses=licenses, hashes=hashes)
            )  # fmt: skip
    return packages


def _pip(root: Path) -> list[Package]:
    """What `pip list` reports in each prefix: the distributions on its site-packages."""
    packages = []
    for prefix in conda_prefixes(root):
        for site in sorted((root / prefix.relative_to("/")).glob("lib/python3*/site-packages")):
            dists = list(metadata.distributions(path=[str(site)]))
            if not any(d.metadata["Name"] == "pip" for d in dists):
                continue  # no `pip list` there
            for dist in dists:
                name = dist.metadata["Name"]
                if not name:
                    continue
                packages.append(
                    Package(PIP, name, dist.version, str(prefix), licenses=_pip_licenses(dist))
                )
    return packages


def _pip_licenses(dist: metadata.Distribution) -> tuple[str, ...]:
    meta = dist.metadata
    if expression := meta.get("License-Expression"):
        return (expression,)
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or []
                   if c.startswith("License :: ")]  # fmt: skip
    if classifiers:
        return tuple(classifiers)
    short = (meta.get("License") or "").strip()
    return (short,) if short and len(short) < 80 and "\n" not in short else ()


def purl(package: Package) -> PackageURL:
    qualifiers = {"arch": package.arch} if package.arch else {}
    if package.kind == CONDA:
        qualifiers = {"build": package.build, "subdir": package.arch}
    namespace = "debian" if package.kind == DEB else None
    return PackageURL(package.kind, namespace, package.name, package.version, qualifiers)


def write_sbom(packages: list[Package], name: str, version: str, path: Path) -> None:
    """A CycloneDX JSON of `packages` for the image `name`, version `version`."""
    licenses = LicenseFactory()
    bom = Bom()
    bom.metadata.component = Component(
        name=name, version=version, type=ComponentType.OPERATING_SYSTEM, bom_ref=name
    )
    for number, package in enumerate(sorted(packages, key=lambda p: p.identity)):
        properties = (
            [Property(name=PROPERTY_PREFIX, value=package.prefix)] if package.prefix else []
        )
        bom.components.add(
            Component(
                name=package.name,
                version=package.version,
                type=ComponentType.LIBRARY,
                purl=purl(package),
                bom_ref=f"{package.kind}-{number}",
                licenses=_licenses(licenses, package.licenses),
                hashes=[
                    HashType(alg=_HASHES[alg], content=value)
                    for alg, value in sorted(package.hashes.items())
                ],  # fmt: skip
                properties=properties,
            )
        )
    with warnings.catch_warnings():  # the packages are listed, not their dependency graph
        warnings.simplefilter("ignore", UserWarning)
        text = JsonV1Dot5(bom).output_as_string(indent=1)
    write_text_atomically(path, text + "\n")


def _licenses(factory: LicenseFactory, texts: tuple[str, ...]) -> list:
    """One licence: an SPDX id or expression when it parses as one. Several: each an SPDX id
    or a name (CycloneDX allows no expression beside other licences)."""
    if len(texts) == 1:
        return [factory.make_from_string(texts[0])]
    made = []
    for text in texts:
        try:
            made.append(factory.make_with_id(text))
        except InvalidSpdxLicenseException:
            made.append(factory.make_with_name(text))
    return made


_HASHES = {"md5": HashAlgorithm.MD5, "sha256": HashAlgorithm.SHA_256}


def read_sbom(path: Path) -> list[Package]:
    """The packages a delivery's SBOM lists: kind, prefix, name, version and licences."""
    document = json.loads(path.read_text())
    packages = []
    for component in document.get("components", []):
        parsed = PackageURL.from_string(component["purl"])
        prefix = next((p["value"] for p in component.get("properties", [])
                       if p.get("name") == PROPERTY_PREFIX), "")  # fmt: skip
        licences = tuple(
            entry.get("expression")
            or entry.get("license", {}).get("id")
            or entry.get("license", {}).get("name", "")
            for entry in component.get("licenses", [])
        )
        packages.append(
            Package(parsed.type, component["name"], component["version"], prefix,
                    licenses=tuple(name for name in licences if name))
        )  # fmt: skip
    return packages


def licence_summary(packages: list[Package]) -> dict[str, int]:
    """{licence: number of packages}, for the dossier; "unknown" counts those without one."""
    counts: dict[str, int] = {}
    for package in packages:
        for licence in package.licenses or ("unknown",):
            counts[licence] = counts.get(licence, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def to_json(packages: list[Package]) -> list[dict]:
    return [asdict(p) for p in packages]


def from_json(rows: list[dict]) -> list[Package]:
    return [Package(**{**row, "licenses": tuple(row.get("licenses", ()))}) for row in rows]
