"""Conda environments: each one the profile names exists with its Python, its packages import,
and what is installed is exactly what was locked."""

from __future__ import annotations

import json

from factory.image_layout import CONDA_ENVS
from factory.profile import Environment, package_name
from factory.validate.context import FAILED, CheckContext, CheckResult, quote, result

ENV_PROBE = r"""
import importlib, importlib.metadata as md, json, os, platform, sys
request = json.load(sys.stdin)
out = {"python": platform.python_version(), "prefix": sys.prefix, "conda": {}, "pip": {}}
meta = os.path.join(sys.prefix, "conda-meta")
records = {}
for name in os.listdir(meta) if os.path.isdir(meta) else []:
    if name.endswith(".json"):
        with open(os.path.join(meta, name)) as handle:
            record = json.load(handle)
        records[record["name"]] = record["version"]
for package in request["conda"]:
    out["conda"][package] = records.get(package)
modules = md.packages_distributions()
for package in request["pip"]:
    try:
        version = md.version(package)
    except md.PackageNotFoundError:
        out["pip"][package] = {"error": "not installed"}
        continue
    dist = md.distribution(package)
    wanted = {package.lower().replace("-", "_")}
    tops = [m for m, dists in modules.items()
            if any(d.lower().replace("-", "_") in wanted for d in dists) and not m.startswith("_")]
    try:
        for module in tops[:3] or [package.replace("-", "_")]:
            importlib.import_module(module)
        out["pip"][package] = {"version": version, "imported": tops[:3]}
    except Exception as error:
        out["pip"][package] = {"version": version, "error": f"import failed: {error}"}
    del dist
print(json.dumps(out))
"""

EXPORT_PROBE = r"""
import importlib.metadata as md, json, os, sys
meta = os.path.join(sys.prefix, "conda-meta")
conda = {}
for name in sorted(os.listdir(meta)) if os.path.isdir(meta) else []:
    if name.endswith(".json"):
        with open(os.path.join(meta, name)) as handle:
            record = json.load(handle)
        conda[record["name"]] = record["version"]
pip = {d.metadata["Name"].lower().replace("_", "-").replace(".", "-"): d.version
       for d in md.distributions()}
print(json.dumps({"conda": conda, "pip": pip}, sort_keys=True))
"""


def check_environment(ctx: CheckContext, env: Environment) -> list[CheckResult]:
    """The environment exists, runs the profile's Python and imports every package."""
    group = f"env:{env.name}"
    prefix = f"{CONDA_ENVS}/{env.name}"
    conda = [n for n in map(package_name, env.conda) if n != "python"]
    pip = [package_name(s) for s in env.pip]
    request = json.dumps({"conda": conda, "pip": pip})
    probe = ctx.target.run(f"{prefix}/bin/python -c {quote(ENV_PROBE)}", stdin=request)
    if not probe.ok:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return [
            CheckResult(
                f"{env.name}: environment exists",
                FAILED,
                f"{prefix}/bin/python failed: {reason}",
                group=group,
            )
        ]
    data = json.loads(probe.stdout)
    results = [
        result(
            f"{env.name}: environment exists",
            data["prefix"] == prefix,
            f"sys.prefix is {data['prefix']}",
            group,
        ),
        result(
            f"{env.name}: python {env.python}",
            (data["python"] + ".").startswith(env.python + "."),
            f"python {data['python']}",
            group,
        ),
    ]
    for name in conda:
        version = data["conda"].get(name)
        results.append(
            result(
                f"{env.name}: conda package {name}",
                version is not None,
                f"version {version}" if version else "not installed",
                group,
            )
        )
    for name in pip:
        info = data["pip"].get(name, {"error": "not reported"})
        ok = "error" not in info
        detail = (
            f"{info.get('version')} imports {', '.join(info.get('imported', []))}"
            if ok
            else info["error"]
        )
        results.append(result(f"{env.name}: imports {name}", ok, detail, group))
    return results


def export_environment(ctx: CheckContext, name: str) -> dict | None:
    """What is really installed in an environment: conda records and pip distributions."""
    probe = ctx.target.run(f"{CONDA_ENVS}/{name}/bin/python -c {quote(EXPORT_PROBE)}")
    return json.loads(probe.stdout) if probe.ok else None


def check_matches_lock(ctx: CheckContext, lock: dict) -> list[CheckResult]:
    """Every locked package is installed at its locked version. The result carries what was
    read back (`data`), which the run saves beside the reports."""
    name, group = lock["name"], f"env:{lock['name']}"
    installed = export_environment(ctx, name)
    if installed is None:
        return [
            CheckResult(
                f"{name}: matches its lock", FAILED, "cannot read the environment", group=group
            )
        ]
    wrong = []
    for kind in ("conda", "pip"):
        for package in lock[kind]:
            have = installed[kind].get(package["name"])
            if have != package["version"]:
                wrong.append(f"{package['name']} {have or 'missing'} (lock {package['version']})")
    count = len(lock["conda"]) + len(lock["pip"])
    detail = "; ".join(wrong) or f"all {count} locked packages at their locked versions"
    checked = result(f"{name}: matches its lock", not wrong, detail, group)
    checked.data = {"environment": name, "installed": installed}
    return [checked]
