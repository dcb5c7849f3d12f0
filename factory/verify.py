"""`factory verify`: a delivery checked offline, as its receiver would check it. Every line of
SHA256SUMS, the signature SHA256SUMS.sig against the delivery's certificate signer.crt, and in
each OVA every member against its manifest and the manifest against the signature in the
OVA's .cert member. Each check is one finding, named by the file it is about.

With a profile (`factory verify DELIVERY --profile PROFILE`), also whether the delivery is
current: built from the layers the profile keys now, and validated as this very OVA. A
scheduler's job skips its build when it is (factory/plan_formats.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography import x509

from factory.signing import (
    CERTIFICATE_FILE,
    SIGNATURE_FILE,
    fingerprint,
    signature_matches,
    subject_name,
)

CHECKSUMS_FILE = "SHA256SUMS"
_CHECKSUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_DIGEST_LINE = re.compile(r"^(SHA1|SHA256)\((.+)\)= ?([0-9a-fA-F]+)$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Finding:
    """One check: the file it is about (relative to the delivery), and what was found."""

    name: str
    ok: bool
    detail: str


def verify_delivery(folder: Path, trusted: x509.Certificate | None = None) -> list[Finding]:
    """Every check of the delivery in `folder`. `trusted` is the signer's certificate as the
    receiver got it from the delivery team; without it the delivery's own signer.crt is taken
    at its word (its fingerprint is in the findings, to compare)."""
    folder = Path(folder)
    findings = _checksums(folder)
    certificate, found = _signer(folder, trusted)
    findings += found
    for ova in sorted(folder.glob("*.ova")):
        findings += _ova(folder, ova, trusted or certificate)
    return findings


def _digest(stream, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return _digest(handle, "sha256")


def _inside(folder: Path, name: str) -> Path | None:
    """folder/name when `name` is a plain relative path that stays inside the folder."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        return None
    return folder.joinpath(*parts)


def _checksums(folder: Path) -> list[Finding]:
    sums = folder / CHECKSUMS_FILE
    if not sums.is_file():
        return [Finding(CHECKSUMS_FILE, False, "missing; this is not a delivery folder")]
    findings = []
    lines = sums.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        match = _CHECKSUM_LINE.match(line)
        if not match:
            detail = f"line {number} is not '<sha256>  <file>'"
            findings.append(Finding(CHECKSUMS_FILE, False, detail))
            continue
        expected, name = match.group(1).lower(), match.group(2)
        path = _inside(folder, name)
        if path is None:
            detail = f"line {number} names {name!r}, outside the delivery"
            findings.append(Finding(CHECKSUMS_FILE, False, detail))
        elif not path.is_file():
            findings.append(Finding(name, False, "missing (SHA256SUMS lists it)"))
        elif _file_sha256(path) != expected:
            detail = "sha256 differs from SHA256SUMS: the file changed after it was delivered"
            findings.append(Finding(name, False, detail))
        else:
            findings.append(Finding(name, True, "sha256 matches SHA256SUMS"))
    if not lines:
        findings.append(Finding(CHECKSUMS_FILE, False, "lists no file"))
    return findings


def _load_certificate(data: bytes) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        return None


def _signer(
    folder: Path, trusted: x509.Certificate | None
) -> tuple[x509.Certificate | None, list[Finding]]:
    """The delivery's certificate (when it may be used) and the findings on SHA256SUMS.sig."""
    signature, cert_file = folder / SIGNATURE_FILE, folder / CERTIFICATE_FILE
    if not signature.is_file():
        detail = "missing: the delivery is not signed (its profile has no signing.key)"
        return None, [Finding(SIGNATURE_FILE, False, detail)]
    if not cert_file.is_file():
        return None, [Finding(CERTIFICATE_FILE, False, "missing: nothing to check the signature")]
    certificate = _load_certificate(cert_file.read_bytes())
    if certificate is None:
        return None, [Finding(CERTIFICATE_FILE, False, "is not a PEM certificate")]
    findings = []
    if trusted is not None and certificate != trusted:
        detail = (
            f"is not the trusted certificate: fingerprint {fingerprint(certificate)}, "
            f"expected {fingerprint(trusted)}"
        )
        return None, [Finding(CERTIFICATE_FILE, False, detail)]
    signer = f"{subject_name(certificate)!r} (sha256 fingerprint {fingerprint(certificate)})"
    findings.append(Finding(CERTIFICATE_FILE, True, f"signer {signer}"))
    sums = folder / CHECKSUMS_FILE
    if sums.is_file() and signature_matches(certificate, sums.read_bytes(), signature.read_bytes()):
        findings.append(Finding(SIGNATURE_FILE, True, "signs SHA256SUMS"))
    elif sums.is_file():
        detail = "does not match SHA256SUMS and signer.crt: one of them changed after signing"
        findings.append(Finding(SIGNATURE_FILE, False, detail))
    return certificate, findings


def _ova(folder: Path, ova: Path, certificate: x509.Certificate | None) -> list[Finding]:
    """The OVA's members against its manifest, and the manifest against its .cert, which
    `certificate` (the delivery's signer, when known) must hold."""
    name = ova.relative_to(folder).as_posix()
    try:
        with tarfile.open(ova, "r:") as archive:
            members = {m.name: m for m in archive.getmembers() if m.isfile()}
            stem = next((n[:-4] for n in members if n.endswith(".ovf")), None)
            if stem is None:
                return [Finding(name, False, "holds no .ovf descriptor")]
            manifest_name, cert_name = f"{stem}.mf", f"{stem}.cert"
            if manifest_name not in members:
                return [Finding(name, False, f"holds no manifest {manifest_name}")]
            manifest = archive.extractfile(members[manifest_name]).read()
            listed, problems = _manifest_entries(manifest)
            for member in sorted(set(members) - {manifest_name, cert_name} - set(listed)):
                problems.append(f"{member} is not in the manifest")
            for member, (algorithm, expected) in listed.items():
                if member not in members:
                    problems.append(f"{member} is in the manifest but not in the OVA")
                elif _digest(archive.extractfile(members[member]), algorithm) != expected:
                    problems.append(f"{member}'s {algorithm} differs from the manifest")
            cert_text = (
                archive.extractfile(members[cert_name]).read() if cert_name in members else None
            )
    except (tarfile.TarError, OSError, EOFError) as error:
        return [Finding(name, False, f"cannot be read as an OVA (tar): {error}")]
    findings = [Finding(name, not problems, "; ".join(problems) or "every member matches")]
    findings.append(_ova_signature(name, manifest_name, manifest, cert_text, certificate))
    return findings


def _manifest_entries(manifest: bytes) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """member -> (hashlib name, hex digest) of an OVF manifest, and its malformed lines."""
    entries, problems = {}, []
    for number, line in enumerate(manifest.decode("utf-8", "replace").splitlines(), 1):
        match = _DIGEST_LINE.match(line.strip())
        if match:
            entries[match.group(2)] = (match.group(1).lower(), match.group(3).lower())
        elif line.strip():
            problems.append(f"manifest line {number} is not 'SHA256(<file>)= <digest>'")
    return entries, problems


def _ova_signature(
    name: str,
    manifest_name: str,
    manifest: bytes,
    cert_text: bytes | None,
    certificate: x509.Certificate | None,
) -> Finding:
    """The .cert member: its signature over the manifest, by the delivery's signer."""
    if cert_text is None:
        return Finding(name, False, "is not signed (no .cert member)")
    first, _, pem = cert_text.partition(b"\n")
    match = _DIGEST_LINE.match(first.decode("ascii", "replace").strip())
    signed = _load_certificate(pem)
    if not match or match.group(2) != manifest_name or signed is None:
        detail = f"its .cert is not 'SHA256({manifest_name})= <signature>' and a PEM certificate"
        return Finding(name, False, detail)
    algorithm, signature = match.group(1).lower(), match.group(3)
    if len(signature) % 2 or not signature_matches(
        signed, manifest, bytes.fromhex(signature), algorithm
    ):
        return Finding(name, False, "its .cert signature does not match its manifest")
    if certificate is not None and signed != certificate:
        return Finding(name, False, f"is signed by another certificate than {CERTIFICATE_FILE}")
    return Finding(name, True, f"the manifest is signed by {subject_name(signed)!r}")


def current_for(
    folder: Path, profile: Path, groups: tuple[str, ...] | None = None
) -> list[Finding]:
    """The delivery against what `profile` makes now: its layers, and its validation, which
    must cover `groups` of checks (all of them by default)."""
    from factory.layers import chain_keys
    from factory.pipeline import BuildOptions, explain_build
    from factory.profile import load_profile

    loaded = load_profile(profile)
    manifest = _json_in(folder / "manifest.json")
    recorded = (manifest.get("extra") or {}).get("layers") if manifest else None
    if not recorded:
        findings = [Finding("manifest.json", False, "records no layer keys: build it again")]
    else:
        statuses = explain_build(loaded, BuildOptions(outputs=folder.parent))
        now = chain_keys([status.layer for status in statuses])
        findings = [_layers_finding(recorded, now, profile)]
    return findings + [_validation_finding(folder, groups)]


def _json_in(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _layers_finding(recorded: list[dict], now: list[dict], profile: Path) -> Finding:
    for built, wanted in zip(recorded, now, strict=False):
        if built != wanted:
            return Finding(
                "manifest.json",
                False,
                f"layer {wanted['name']!r} differs: built from {built['key'][:12]}, "
                f"{profile.name} makes {wanted['key'][:12]} now",
            )
    if len(recorded) != len(now):
        names = ", ".join(layer["name"] for layer in now)
        return Finding("manifest.json", False, f"{profile.name} now makes the layers {names}")
    return Finding(
        "manifest.json", True, f"built from the {len(now)} layers {profile.name} makes now"
    )


def _validation_finding(folder: Path, groups: tuple[str, ...] | None = None) -> Finding:
    """report.json passed, for the OVA that SHA256SUMS lists (its own finding checks the file),
    and covered `groups` (None: every group)."""
    report = _json_in(folder / "report.json")
    if report is None:
        return Finding("report.json", False, "missing: run `factory validate` on the delivery")
    failed = (report.get("summary") or {}).get("failed", 1)
    if failed:
        return Finding("report.json", False, f"{failed} check(s) failed on {report.get('created')}")
    ova = (report.get("subject") or {}).get("ova") or {}
    listed = {}
    if (folder / CHECKSUMS_FILE).is_file():
        for line in (folder / CHECKSUMS_FILE).read_text(errors="replace").splitlines():
            if match := _CHECKSUM_LINE.match(line):
                listed[match.group(2)] = match.group(1).lower()
    if not ova or listed.get(ova.get("name")) != ova.get("sha256"):
        detail = "is for another OVA than SHA256SUMS lists: validate this one"
        return Finding("report.json", False, detail)
    checked = (report.get("subject") or {}).get("only")  # None: every group
    missing = _uncovered(checked, groups)
    if missing:
        return Finding(
            "report.json",
            False,
            f"validated only for {', '.join(checked)}, not for {', '.join(missing)}: "
            "run `factory validate` with those groups",
        )
    passed = report["summary"].get("passed", 0)
    scope = f" (only {', '.join(checked)})" if checked else ""
    return Finding(
        "report.json",
        True,
        f"{ova['name']} passed {passed} checks{scope} on {report.get('created')}",
    )


def _uncovered(checked: list[str] | None, wanted: tuple[str, ...] | None) -> list[str]:
    """The wanted groups a validation of `checked` groups (None: all) did not run."""
    if checked is None:
        return []
    if wanted is None:
        from factory.validate.suites import SUITES

        wanted = SUITES
    return [group for group in wanted if group not in checked]
