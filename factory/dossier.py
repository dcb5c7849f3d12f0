"""handover.html: the one page the client's IT reads first. It is written from the delivery
folder alone (after the build, and again after `factory validate`), works offline, and prints:
the artifacts and their sums, the build record, the validation results, the locks and what the
image really holds, the licences, the first-boot credentials, the ports, and import steps."""

from __future__ import annotations

import json
from pathlib import Path

from factory.deploy_imports import import_commands
from factory.files import write_text_atomically
from factory.handover import credentials_text
from factory.profile import LoadedProfile, load_profile
from factory.sbom import SBOM_FILE, licence_summary, read_sbom
from factory.signing import CERTIFICATE_FILE, SIGNATURE_FILE, verification_commands
from factory.templates import render_template

DOSSIER_FILE = "handover.html"
LINKED_FILES = [
    ("HANDOVER.md", "access and credentials, as text"),
    ("SHA256SUMS", "the artifacts' sums"),
    (SIGNATURE_FILE, "the signature over SHA256SUMS"),
    (CERTIFICATE_FILE, "the signer's certificate (public)"),
    ("manifest.json", "the build record"),
    ("report.html", "the validation report"),
    ("report.json", "the validation results, as JSON"),
    ("report.xml", "the validation results, as JUnit XML"),
    (SBOM_FILE, "the SBOM (CycloneDX)"),
    ("security-index.json", "the security updates the image holds"),
    ("profile.yaml", "the effective profile"),
    ("grafana-dashboard.json", "a Grafana dashboard for the node exporter"),
    ("build.log", "the build log"),
]


def _json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _services(loaded: LoadedProfile) -> list[tuple[str, str]]:
    """(port, what answers there) for each port the firewall opens."""
    profile = loaded.profile
    known = {22: "SSH (keys only)"}
    if profile.jupyter.enabled:
        known |= {443: "Jupyter Lab behind nginx (HTTPS, token)", 80: "redirect to HTTPS"}
    if profile.monitoring.enabled:
        known[9100] = "Prometheus node exporter"
    return [(str(port), known.get(port, "the client's own service")) for port in
            profile.open_ports()]  # fmt: skip


def _licences(path: Path) -> tuple[list[tuple[str, int]], list[dict]]:
    """(licence, packages) counts and one row per package, from the SBOM at `path`."""
    if not path.is_file():
        return [], []
    packages = read_sbom(path)
    rows = [{"kind": p.kind, "name": p.name, "version": p.version, "where": p.prefix,
             "licences": ", ".join(p.licenses or ("unknown",))} for p in packages]  # fmt: skip
    rows.sort(key=lambda r: (r["kind"], r["where"], r["name"].lower()))
    return list(licence_summary(packages).items()), rows


def _locks(folder: Path) -> list[dict]:
    locks = []
    for path in sorted((folder / "locks").glob("*.lock.json")):
        lock = json.loads(path.read_text())
        locks.append(
            {
                "name": lock.get("name", path.stem),
                "file": f"locks/{path.name}",
                "conda": len(lock.get("conda", [])),
                "pip": len(lock.get("pip", [])),
            }
        )
    return locks


def _read_back(folder: Path) -> list[dict]:
    envs = []
    for path in sorted((folder / "envs").glob("*.installed.json")):
        installed = json.loads(path.read_text())
        envs.append({"name": path.name.removesuffix(".installed.json"),
                     "file": f"envs/{path.name}",
                     "conda": sorted(installed.get("conda", {}).items()),
                     "pip": sorted(installed.get("pip", {}).items())})  # fmt: skip
    return envs


def write_dossier(folder: Path) -> Path:
    """folder/handover.html, from what the delivery folder holds now."""
    folder = Path(folder)
    loaded = load_profile(folder / "profile.yaml")
    profile = loaded.profile
    manifest = _json(folder / "manifest.json") or {}
    report = _json(folder / "report.json")
    counts, packages = _licences(folder / SBOM_FILE)
    html = render_template(
        "handover.html.j2",
        delivery=loaded.name,
        profile=profile,
        manifest=manifest,
        extra=manifest.get("extra", {}),
        report=report,
        locks=_locks(folder),
        environments=_read_back(folder),
        licence_counts=counts,
        packages=packages,
        credentials=credentials_text(loaded),
        services=_services(loaded),
        files=[(n, what) for n, what in LINKED_FILES if (folder / n).exists()],
        signed=(folder / SIGNATURE_FILE).is_file(),
        verification=verification_commands(loaded.name),
        ova=f"{loaded.name}.ova",
        qcow2=f"{loaded.name}.qcow2",
        imports=import_commands(folder, loaded),
    )
    path = folder / DOSSIER_FILE
    write_text_atomically(path, html)
    return path
