"""The delivery's SBOM against the machine: every package that dpkg-query, the conda metadata
and `pip list` report is in the SBOM, and the SBOM lists nothing else. On a delivered image
this proves the SBOM; on a live client host (`--delivery`) it reports drift since delivery."""

from __future__ import annotations

import json
from pathlib import Path

from factory.image_layout import CONDA_ENVS, CONDA_PREFIX
from factory.sbom import CONDA, DEB, PIP, Package, read_sbom
from factory.validate.context import CheckContext, CheckResult, quote, result

GROUP = "sbom"
SHOWN = 8  # differences named in a detail before "and N more"

DPKG_QUERY = r"dpkg-query -W -f '${db:Status-Abbrev}\t${Package}\t${Version}\n'"
CONDA_PROBE = r"""
import glob, json, os, sys
candidates = [sys.argv[1], *sorted(glob.glob(os.path.join(sys.argv[2], "*")))]
prefixes = [p for p in candidates if os.path.isdir(os.path.join(p, "conda-meta"))]
out = {}
for prefix in prefixes:
    records = []
    for path in sorted(glob.glob(os.path.join(prefix, "conda-meta", "*.json"))):
        with open(path) as handle:
            record = json.load(handle)
        records.append([record["name"], record["version"]])
    out[prefix] = records
print(json.dumps(out))
"""


def machine_packages(ctx: CheckContext) -> list[Package]:
    """What the machine's own tools report: dpkg-query, conda-meta, and pip list per prefix."""
    target = ctx.target
    answer = target.run(DPKG_QUERY)
    if not answer.ok:
        raise RuntimeError(f"dpkg-query failed: {answer.stderr.strip()[:200]}")
    found = []
    for line in answer.stdout.splitlines():
        status, name, version = (line.split("\t") + ["", ""])[:3]
        if status.startswith("ii"):
            found.append(Package(DEB, name, version))
    conda = target.run(f"python3 -c {quote(CONDA_PROBE)} {CONDA_PREFIX} {CONDA_ENVS}")
    if not conda.ok:
        raise RuntimeError(f"reading conda-meta failed: {conda.stderr.strip()[:200]}")
    for prefix, records in json.loads(conda.stdout).items():
        found += [Package(CONDA, name, version, prefix) for name, version in records]
        python = f"{prefix}/bin/python"
        listed = target.run(
            f"test -x {quote(python)} && {quote(python)} -m pip list --format json "
            "--disable-pip-version-check 2>/dev/null"
        )
        if listed.ok:
            found += [
                Package(PIP, p["name"], p["version"], prefix) for p in json.loads(listed.stdout)
            ]
    return found


def differences(listed: list[Package], found: list[Package]) -> dict[str, list[str]]:
    """{"added": [...], "removed": [...], "changed": [...]}: the machine against the SBOM."""
    by_key = {}
    for side, packages in (("listed", listed), ("found", found)):
        for package in packages:
            kind, prefix, name, version = package.identity
            by_key.setdefault((kind, prefix, name), {}).setdefault(side, set()).add(version)
    out: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
    for (kind, prefix, name), sides in sorted(by_key.items()):
        where = f"{kind}:{name}" + (f" ({prefix})" if prefix else "")
        was, now = sides.get("listed", set()), sides.get("found", set())
        if not was:
            out["added"].append(f"{where} {', '.join(sorted(now))}")
        elif not now:
            out["removed"].append(f"{where} {', '.join(sorted(was))}")
        elif was != now:
            out["changed"].append(f"{where} {', '.join(sorted(was))} -> {', '.join(sorted(now))}")
    return out


def describe(found: list[Package], diff: dict[str, list[str]]) -> str:
    counts = {kind: sum(p.kind == kind for p in found) for kind in (DEB, CONDA, PIP)}
    summary = f"{counts[DEB]} Debian, {counts[CONDA]} conda, {counts[PIP]} pip packages"
    parts = []
    for what, items in diff.items():
        if items:
            more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
            parts.append(f"{what}: {'; '.join(items[:SHOWN])}{more}")
    return "; ".join(parts) + f" (machine: {summary})" if parts else summary


def check_sbom(ctx: CheckContext) -> list[CheckResult]:
    """The SBOM the delivery holds against what the machine reports."""
    path: Path | None = ctx.extra.get("sbom")
    if path is None:
        return []
    found = machine_packages(ctx)
    diff = differences(read_sbom(path), found)
    clean = not any(diff.values())
    if ctx.throwaway_vm:
        name = "sbom: lists every package in the image, and nothing else"
    else:
        name = "drift: no package added, removed or changed since the delivery"
    return [result(name, clean, describe(found, diff), GROUP)]
