"""The factory's benchmark: every number of benchmarks/README.md in one run on one machine.

    .venv/bin/python -m benchmarks.bench [--only P1,P2,...] [--keep] [--work-dir DIR] [--results F]

P1 cold demo to a validated OVA; P2 rebuild after a pip change; P3 conflict on the host against
in a VM build; P4 OVA size against an unminimised qcow2; P5 boot to Jupyter over HTTPS; P6 three
profiles with --jobs 3; P7 cold bank profile; baseline: the demo built by one plain in-guest
Packer template. Writes benchmarks/results.json (merged with the sections of an earlier run
that this one did not measure) and prints a table; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from rich.console import Console

from factory import cache
from factory.profile import ALLOWED_ROOTS_ENV_VAR
from factory.progress import Progress

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results.json"
CONFLICT_RESULTS = REPO / "benchmarks" / "results" / "conflict_time.json"
DEMO = REPO / "profiles" / "demo.yaml"
BANK = REPO / "profiles" / "bank_credit_risk_v2.yaml"
CHANNEL_LINK = REPO / "outputs" / "channels" / "demo"

STEPS = ("P1", "P5", "P4", "P2", "baseline", "P3", "P6", "P7")  # the order they run in
NEEDS_P1_NOW = ("P2", "P4", "P5", "baseline")  # they reuse P1's cache or delivery
NEEDS_CHANNEL = ("P1", "P6", "P7")
THRESHOLDS = {"P2": 0.15, "P4": 0.5, "P6": 0.5, "baseline": 0.5}
P2_PIN = ("tabulate", "tabulate==0.9.0")  # the demo locks tabulate 0.10.0
P6_VARIANTS = {"demo-b": (2, "idna"), "demo-c": (3, "colorama")}  # stem: (version, extra pip)
CONFLICT_CASE = "two pins of one package"
HTTPS_DEADLINE_SECONDS = 900
_BUILT = re.compile(r"^built (\S+) in \d+ s: (.+)$", re.M)
_LAYER = re.compile(r"layer (?P<name>.+?): (?P<state>hit|miss)(?: \((?P<why>.*)\))?$")
_SHARED = re.compile(r"(layer .+: made by another build.*|waiting for layer .*)$")


class BenchError(Exception):
    """A step failed; the message says which and where its log is."""


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


@contextmanager
def timed(name: str) -> Iterator[None]:
    log(f"{name}: started")
    started = time.monotonic()
    try:
        yield
    except BaseException:
        log(f"{name}: failed after {time.monotonic() - started:.0f} s")
        raise
    log(f"{name}: done in {time.monotonic() - started:.0f} s")


@dataclass(frozen=True)
class Run:
    seconds: float
    output: str


@dataclass(frozen=True)
class Built:
    """What later steps reuse of a cold build: its cache, profile copy and delivery."""

    cache: Path
    profile: Path
    delivery: Path


@dataclass
class Bench:
    work: Path
    channel: Path | None
    stamp: dict
    p1: Built | None = None

    def factory(self, args: list[str], cache: Path, log_path: Path) -> Run:
        """`factory --cache-dir CACHE ARGS`, timed, its output kept in log_path."""
        command = [sys.executable, "-m", "factory", "--cache-dir", str(cache)]
        if self.channel:  # a fresh cache does not hold the demo channel: allow its folder
            command += ["--allow-root", str(self.channel)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as handle:
            started = time.monotonic()
            code = subprocess.run(
                [*command, *args],
                cwd=REPO,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            ).returncode
            seconds = time.monotonic() - started
        output = log_path.read_text(errors="replace")
        if code != 0:
            lines = [ln.strip() for ln in output.splitlines() if ln.strip()] or ["(no output)"]
            last = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1])
            raise BenchError(f"`factory {args[0]}` exited {code}: {last} (log {log_path})")
        return Run(round(seconds, 1), output)


# --- machine and profiles ---------------------------------------------------------------


def git(*args: str) -> str:
    run = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return run.stdout.strip()


def run_stamp() -> dict:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
    }


def machine_facts() -> dict:
    from factory import kvm
    from factory.pipeline import tool_versions

    meminfo = Path("/proc/meminfo").read_text()
    memory_kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return {
        "cores": os.cpu_count(),
        "memory_mib": memory_kib // 1024,
        "cpu_model": cpu.group(1) if cpu else platform.processor(),
        "accelerator": kvm.choose_accelerator("auto"),  # a cached verdict of a real KVM boot
        "kvm_device": Path(kvm.KVM_DEVICE).exists(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "tools": tool_versions(),
    }


def demo_channel() -> Path:
    """The local conda channel profiles/demo.yaml names (`make channel` links it)."""
    if not (CHANNEL_LINK.resolve() / "noarch" / "repodata.json").is_file():
        raise BenchError(
            f"{CHANNEL_LINK.relative_to(REPO)} is missing or incomplete: the demo and bank "
            "profiles install from it; run `make channel` first"
        )
    return CHANNEL_LINK.resolve()


def _absolute(value: str, folder: Path) -> str:
    return os.path.normpath(folder / value)


def _local_path(channel: object) -> bool:
    text = str(channel)
    return not re.match(r"^[a-z][a-z0-9+.-]*://", text) and ("/" in text or text.startswith("."))


def copy_profile(
    source: Path, folder: Path, stem: str | None = None, edit: Callable[[dict], None] | None = None
) -> Path:
    """A copy of a profile in `folder`, the files and local channels it names made absolute
    (they were relative to its own folder), with its lock folder when it has one."""
    data = yaml.safe_load(source.read_text())
    here = source.parent
    extends = data.get("extends")
    if isinstance(extends, str) and (extends.endswith((".yaml", ".yml")) or "/" in extends):
        data["extends"] = _absolute(extends, here)
    elif isinstance(extends, list):
        data["extends"] = [_absolute(e, here) if "/" in e else e for e in extends]
    if "notebooks" in data:
        data["notebooks"] = [
            n if n.startswith("preset:") else _absolute(n, here) for n in data["notebooks"]
        ]
    for service in data.get("services", []):
        service["files"] = [_absolute(f, here) for f in service.get("files", [])]
    for env in data.get("environments", []):
        env["channels"] = [_absolute(c, here) if _local_path(c) else c for c in env["channels"]]
        if "environment_file" in env:
            env["environment_file"] = _absolute(env["environment_file"], here)
    tls = (data.get("jupyter") or {}).get("tls") or {}
    for key in ("certificate", "key"):
        if key in tls:
            tls[key] = _absolute(tls[key], here)
    if edit:
        edit(data)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem or source.stem}.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False, width=1000))
    if source.with_suffix(".lock").is_dir():
        shutil.copytree(source.with_suffix(".lock"), target.with_suffix(".lock"))
    return target


def _pip_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower()


def pin_pip(name: str, spec: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        found = False
        for env in data.get("environments", []):
            pips = env.get("pip", [])
            found |= any(_pip_name(p) == name for p in pips)
            env["pip"] = [spec if _pip_name(p) == name else p for p in pips]
        if not found:
            raise BenchError(f"the profile has no pip package {name} to change")

    return edit


def variant(version: int, extra_pip: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["version"] = version
        data["environments"][0].setdefault("pip", []).append(extra_pip)

    return edit


# --- reading what a build left ----------------------------------------------------------


def delivery_of(output: str) -> Path:
    found = _BUILT.findall(output)
    if not found:
        raise BenchError("`factory build` did not end with its `built NAME in N s: PATH` line")
    return Path(found[-1][1].strip())


def layer_states(output: str) -> list[dict]:
    """The build's `layer X: hit` / `layer X: miss (why)` lines, in chain order."""
    states = []
    for line in output.splitlines():
        if match := _LAYER.search(line.strip()):
            states.append({k: v for k, v in match.groupdict().items() if v is not None})
    return states


def manifest_of(delivery: Path) -> dict:
    return json.loads((delivery / "manifest.json").read_text())


def stage_seconds(record: dict, name: str) -> float | None:
    """A stage's seconds from a manifest (or a section) that lists `stages`."""
    return next((s["seconds"] for s in record.get("stages", []) if s["name"] == name), None)


def qemu_img_json(*args: str) -> object:
    return json.loads(
        subprocess.run(
            ["qemu-img", *args, "--output=json"], check=True, capture_output=True, text=True
        ).stdout
    )


def sizes(path: Path) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "allocated_bytes": stat.st_blocks * 512}


# --- the steps ----------------------------------------------------------------------------


def cold_build(bench: Bench, name: str, source: Path) -> tuple[dict, Built]:
    """A profile to a validated OVA with a fresh, empty cache: build, then validate."""
    folder = bench.work / name
    lock = "copied with the profile" if source.with_suffix(".lock").is_dir() else "solved"
    profile = copy_profile(source, folder / "profile")
    cache = folder / "cache"
    with timed(f"{name} build ({source.name}, fresh cache)"):
        build = bench.factory(
            ["build", str(profile), "--outputs", str(folder / "outputs")],
            cache,
            folder / "build.log",
        )
    delivery = delivery_of(build.output)
    with timed(f"{name} validate"):
        check = bench.factory(["validate", str(delivery)], cache, folder / "validate.log")
    manifest = manifest_of(delivery)
    section = {
        "measured": {
            "build_seconds": build.seconds,
            "validate_seconds": check.seconds,
            "manifest_build_seconds": manifest["build"]["duration_s"],
            "stages": manifest.get("stages", []),
            "layers": layer_states(build.output),
            "accelerator": manifest.get("extra", {}).get("accelerator"),
            "artifacts": manifest.get("artifacts", []),
        },
        "derived": {"total_seconds": round(build.seconds + check.seconds, 1)},
        "profile": str(source.relative_to(REPO)),
        "lock": lock,
    }
    return section, Built(cache, profile, delivery)


def bench_p2(bench: Bench, p1: Built) -> dict:
    """The P1 profile with one pip package pinned to another version, rebuilt on P1's cache."""
    folder = bench.work / "P2"
    profile = copy_profile(p1.profile, folder / "profile", edit=pin_pip(*P2_PIN))
    with timed(f"P2 rebuild ({P2_PIN[1]})"):
        build = bench.factory(
            ["build", str(profile), "--outputs", str(folder / "outputs")],
            p1.cache,
            folder / "build.log",
        )
    states = layer_states(build.output)
    return {
        "measured": {
            "rebuild_seconds": build.seconds,
            "stages": manifest_of(delivery_of(build.output)).get("stages", []),
            "layers": states,
        },
        "derived": {
            "hits": [s["name"] for s in states if s["state"] == "hit"],
            "misses": [s["name"] for s in states if s["state"] == "miss"],
        },
        "change": f"pip {P2_PIN[0]} -> {P2_PIN[1]}",
    }


def bench_p4(bench: Bench, p1: Built) -> dict:
    """The OVA against `qemu-img convert -O qcow2` (no compression) of the delivered qcow2."""
    delivered = p1.delivery / f"{p1.delivery.name}.qcow2"
    ova = p1.delivery / f"{p1.delivery.name}.ova"
    unminimised = bench.work / "P4" / "unminimised.qcow2"
    unminimised.parent.mkdir(parents=True, exist_ok=True)
    with timed("P4 unminimised qcow2"):
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(delivered), str(unminimised)], check=True
        )
    data = sum(e["length"] for e in qemu_img_json("map", str(delivered)) if e.get("data"))
    guest_disk = manifest_of(p1.delivery).get("extra", {}).get("guest_disk") or {}
    section = {
        "measured": {
            "ova": sizes(ova),
            "qcow2_compressed": sizes(delivered),
            "qcow2_unminimised": sizes(unminimised),
            "virtual_bytes": qemu_img_json("info", str(delivered))["virtual-size"],
            "guest_data_bytes": data,  # qemu-img map: clusters holding data, the same disk in all
            # The root file system's used bytes as the build saw it (manifest.json), if recorded.
            "guest_fs_used_bytes": guest_disk.get("used_bytes"),
        }
    }
    unminimised.unlink()
    return section


def wait_for_jupyter(port: int, deadline: float) -> int:
    """The first HTTPS answer that comes from Jupyter (through nginx, which says 502-504
    while Jupyter is not up yet): its status."""
    from factory.validate.web import http_request, unverified_tls

    while time.monotonic() < deadline:
        try:
            answer = http_request(
                ("127.0.0.1", port), "/api/status", tls=unverified_tls(), timeout=10
            )
            if answer.status not in (502, 503, 504):
                return answer.status
        except (OSError, ConnectionError, ssl.SSLError):
            pass
        time.sleep(1)
    raise BenchError(f"Jupyter did not answer over HTTPS within {HTTPS_DEADLINE_SECONDS} s")


def bench_p5(bench: Bench, p1: Built) -> dict:
    """Boot the OVA's disk as `factory validate` does (overlay, seed, no network) and time
    QEMU's start to the first HTTPS answer from Jupyter."""
    from factory import host, kvm
    from factory.cpu import validation_cpu
    from factory.profile import load_profile
    from factory.validate.boot import boot_delivery, extract_ova_disk

    loaded = load_profile(p1.delivery / "profile.yaml")
    accelerator = kvm.choose_accelerator("auto")
    resources = loaded.profile.resources
    size = host.local_vm_size(min(resources.cpus, 2), resources.memory)
    cpu = validation_cpu(loaded.profile.cpu_baseline, accelerator)
    folder = bench.work / "P5"
    folder.mkdir(parents=True, exist_ok=True)
    disk = extract_ova_disk(p1.delivery / f"{p1.delivery.name}.ova", folder)
    with open(folder / "boot.log", "w") as boot_log, timed("P5 boot to Jupyter over HTTPS"):
        with boot_delivery(
            disk,
            size.memory_mib,
            size.cpus,
            accelerator,
            cpu_model=cpu.model,
            restrict_network=True,
            forward_ports=[443],
            log=lambda line: print(line, file=boot_log, flush=True),
        ) as vm:
            qemu_started = time.monotonic() - vm.boot_seconds  # as boot_delivery timed it
            status = wait_for_jupyter(vm.forwards[443], qemu_started + HTTPS_DEADLINE_SECONDS)
            answered = time.monotonic() - qemu_started
    disk.unlink()
    return {
        "measured": {
            "qemu_start_to_host_keys_seconds": round(vm.boot_seconds, 1),
            "qemu_start_to_https_seconds": round(answered, 1),
            "first_https_status": status,
            "accelerator": accelerator,
            "cpus": size.cpus,
            "memory_mib": size.memory_mib,
        },
        "note": "the OVA's disk on a throwaway overlay with the validator's seed, as `factory "
        "validate` boots it; HTTPS is polled (GET /api/status every second) once the host "
        "keys are on the console, so an answer before that would be counted at that moment",
    }


class StepClock(Progress):
    """A factory Progress that also notes when each step was first seen."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.first_seen: dict[str, float] = {}
        self.packer_started = 0.0

    def update(self, step: str) -> None:
        self.first_seen.setdefault(step, time.monotonic())
        super().update(step)


def p1_base_image(p1: Built) -> Path:
    """The Debian base image P1's system layer stands on, from its layer store's manifest."""
    for record in (p1.cache / "layers").glob("*.json"):
        data = json.loads(record.read_text())
        if data.get("name") == "system" and Path(data.get("parent_image") or "").is_file():
            return Path(data["parent_image"])
    raise BenchError(f"no system layer with its base image in {p1.cache / 'layers'}")


def bench_baseline(bench: Bench, p1: Built) -> dict:
    """The demo by one plain Packer template that runs every stage in the guest, on P1's
    cached base image: prepare (lock, installer, render, bundle), then `packer build`."""
    folder = bench.work / "baseline"
    profile = copy_profile(p1.profile, folder / "profile")
    cache.set_cache_dir(p1.cache)  # its packages and wheels
    try:
        with open(folder / "build.log", "w") as build_log:
            progress = StepClock(Console(file=build_log, highlight=False))
            prepare, packer, image = plain_packer_build(
                profile, p1_base_image(p1), folder, progress
            )
    finally:
        cache.set_cache_dir(None)
    env_step = next(
        (t for s, t in progress.first_seen.items() if s.startswith("conda environment")), None
    )
    section = {
        "measured": {
            "prepare_seconds": round(prepare, 1),
            "packer_seconds": round(packer, 1),
            "packer_seconds_to_env_install": round(env_step - progress.packer_started, 1)
            if env_step
            else None,
            "image": sizes(image),
        },
        "derived": {"total_seconds": round(prepare + packer, 1)},
        "note": "P1's base image; no export (the layered build's figure includes its OVA and "
        "qcow2 export, so the comparison is conservative)",
    }
    shutil.rmtree(folder / "packer-output", ignore_errors=True)
    return section


def plain_packer_build(
    profile: Path, base_image: Path, folder: Path, progress: StepClock
) -> tuple[float, float, Path]:
    """Lock, installer, render (all_in_guest), bundle, then `packer build`: the seconds
    preparing, the seconds in packer, and the image it made."""
    from factory import kvm
    from factory.build import run_packer
    from factory.bundle import build_payload, fetch_conda_installer
    from factory.keys import ephemeral_keypair
    from factory.pipeline import packer_version
    from factory.profile import load_profile
    from factory.render import BuildInputs, build_vm_size, render_build_dir
    from factory.resolve import lock_profile

    with ephemeral_keypair("factory-bench-baseline") as key:
        with timed("baseline prepare (lock, installer, render, bundle)"):
            started = time.monotonic()
            loaded = load_profile(profile)
            locks = lock_profile(loaded, log=progress.log)
            source = loaded.profile.conda.installer_source()
            installer = fetch_conda_installer(*source, log=progress.log) if source else None
            inputs = BuildInputs(
                base_image=str(base_image),
                base_image_checksum="none",
                accelerator=kvm.choose_accelerator("auto"),
                output_directory=str(folder / "packer-output"),
                console_log=str(folder / "console.log"),
                build_key=key,
                packer_version=packer_version(),
                all_in_guest=True,
                vm=build_vm_size(loaded),
            )
            build_dir = render_build_dir(loaded, inputs, folder / "build")
            payload = build_dir / "payload"
            build_payload(locks, payload, log=progress.log, conda_installer=installer)
        with timed("baseline packer build (every stage in the guest)"):
            progress.packer_started = time.monotonic()
            run_packer(build_dir, key.private_key_file, folder / "packer.log", progress)
            finished = time.monotonic()
    image = folder / "packer-output" / f"{loaded.name}.qcow2"
    return progress.packer_started - started, finished - progress.packer_started, image


def bench_p3(bench: Bench) -> dict:
    """`factory lock` on the conflict profiles of benchmarks/conflict_time.py, on the host."""
    from benchmarks import conflict_time

    channel = conflict_time.build_test_channel(log=log)
    cases = {}
    with timed("P3 conflicts on the host (factory lock)"):
        for index, (name, (conda, pip)) in enumerate(conflict_time.CASES.items()):
            case_dir = bench.work / "P3" / str(index)
            case_dir.mkdir(parents=True)
            path = conflict_time.profile_with(case_dir, channel, conda, pip)
            cases[name] = conflict_time.timed_lock(path)
    failed = [name for name, case in cases.items() if case["exit"] == 0 or not case["error"]]
    if failed:
        raise BenchError(f"P3: `factory lock` reported no conflict for: {', '.join(failed)}")
    return {"measured": {"host_lock": cases}, "headline_case": CONFLICT_CASE}


def bench_p6(bench: Bench) -> dict:
    """The demo and two variants (other version, one more pip package each) built together
    with --jobs 3 on one fresh cache: they share base, system, conda and jupyter."""
    folder = bench.work / "P6"
    profiles = [copy_profile(DEMO, folder / "profiles")]
    for stem, (version, extra) in P6_VARIANTS.items():
        profiles.append(copy_profile(DEMO, folder / "profiles", stem, variant(version, extra)))
    outputs = folder / "outputs"
    with timed("P6 three profiles, --jobs 3, fresh cache"):
        build = bench.factory(
            ["build", *map(str, profiles), "--jobs", "3", "--outputs", str(outputs)],
            folder / "cache",
            folder / "build.log",
        )
    per_profile = {}
    for profile in profiles:
        output = (outputs / "logs" / f"{profile.stem}.build.log").read_text(errors="replace")
        manifest = manifest_of(delivery_of(output))
        per_profile[profile.stem] = {
            "manifest_build_seconds": manifest["build"]["duration_s"],
            "layers": layer_states(output),
            "shared": [m.group(1) for ln in output.splitlines() if (m := _SHARED.search(ln))],
        }
    return {
        "measured": {"wall_seconds": build.seconds, "profiles": per_profile},
        "variants": {s: f"version {v}, pip + {p}" for s, (v, p) in P6_VARIANTS.items()},
    }


# --- ratios, table, results ---------------------------------------------------------------


def _get(sections: dict, path: str) -> float | None:
    value: object = sections
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) else None


def in_vm_conflict_seconds(sections: dict) -> tuple[float | None, str]:
    """The same conflict found inside a VM build: the earliest an in-guest install could fail,
    from the baseline's packer start to its environment install (derived, not measured)."""
    seconds = _get(sections, "baseline.measured.packer_seconds_to_env_install")
    if seconds is not None:
        run = sections["baseline"]["run"]["date"]
        return seconds, f"baseline: packer start to the env install step (run {run})"
    if CONFLICT_RESULTS.is_file():
        earlier = json.loads(CONFLICT_RESULTS.read_text()).get("in_image_earliest_seconds")
        if isinstance(earlier, int | float):
            return earlier, f"{CONFLICT_RESULTS.relative_to(REPO)}: in_image_earliest_seconds"
    return None, "no baseline run yet: run with --only baseline (needs P1) to measure it"


def ratios(sections: dict) -> dict[str, dict]:
    """Every ratio the sections allow, each with its formula, threshold and inputs."""
    found: dict[str, dict] = {}

    def add(name: str, top: float | None, bottom: float | None, formula: str, **extra) -> None:
        if top is None or not bottom:
            return
        value = round(top / bottom, 3)
        limit = THRESHOLDS.get(name)
        found[name] = {
            "value": value,
            "formula": formula,
            "threshold": limit,
            "pass": None if limit is None else value <= limit,
            "inputs": {"numerator": top, "denominator": bottom, **extra},
        }

    p1_build = _get(sections, "P1.measured.build_seconds")
    p1_total = _get(sections, "P1.derived.total_seconds")
    add(
        "P2",
        _get(sections, "P2.measured.rebuild_seconds"),
        p1_total,
        "P2 rebuild seconds / P1 (build + validate) seconds",
    )
    host = _get(sections, f"P3.measured.host_lock.{CONFLICT_CASE}.seconds")
    in_vm, source = in_vm_conflict_seconds(sections)
    add(
        "P3",
        host,
        in_vm,
        f"host `factory lock` ({CONFLICT_CASE}) / in-VM (derived)",
        in_vm_source=source,
    )
    add(
        "P4",
        _get(sections, "P4.measured.ova.bytes"),
        _get(sections, "P4.measured.qcow2_unminimised.bytes"),
        "OVA bytes / unminimised qcow2 bytes",
    )
    add(
        "P6",
        _get(sections, "P6.measured.wall_seconds"),
        p1_build and 3 * p1_build,
        "P6 wall seconds / (3 x P1 build seconds, a cold build of the demo alone)",
    )
    base = stage_seconds(sections.get("P1", {}).get("measured", {}), "base")
    cached = round(p1_build - base, 1) if p1_build is not None and base is not None else None
    add(
        "baseline",
        cached,
        _get(sections, "baseline.derived.total_seconds"),
        "(P1 build seconds - its base stage) / plain in-guest Packer build seconds",
        base_stage_seconds=base,
    )
    return found


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def error_line(error: str) -> str:
    return "error: " + " ".join(error.split())[:70]


def table(sections: dict, found: dict[str, dict]) -> str:
    from factory.tables import format_table

    def get(path: str) -> float | None:
        return _get(sections, path)

    measured = {
        "P1": f"build {_seconds(get('P1.measured.build_seconds'))} + validate "
        f"{_seconds(get('P1.measured.validate_seconds'))} = "
        f"{_seconds(get('P1.derived.total_seconds'))}",
        "P2": f"rebuild {_seconds(get('P2.measured.rebuild_seconds'))}, hits: "
        + ", ".join(sections.get("P2", {}).get("derived", {}).get("hits", [])),
        "P3": f"host {get(f'P3.measured.host_lock.{CONFLICT_CASE}.seconds') or '-'} s vs "
        f"in-VM ~{_seconds(in_vm_conflict_seconds(sections)[0])} (derived)",
        "P4": f"OVA {_mib(get('P4.measured.ova.bytes'))} vs unminimised "
        f"{_mib(get('P4.measured.qcow2_unminimised.bytes'))} (data "
        f"{_mib(get('P4.measured.guest_data_bytes'))})",
        "P5": f"HTTPS {_seconds(get('P5.measured.qemu_start_to_https_seconds'))} (host keys "
        f"{_seconds(get('P5.measured.qemu_start_to_host_keys_seconds'))})",
        "P6": f"3 builds --jobs 3: {_seconds(get('P6.measured.wall_seconds'))}",
        "P7": f"build {_seconds(get('P7.measured.build_seconds'))} + validate "
        f"{_seconds(get('P7.measured.validate_seconds'))} = "
        f"{_seconds(get('P7.derived.total_seconds'))}",
        "baseline": f"plain build {_seconds(get('baseline.derived.total_seconds'))}; demo with "
        "cached base " + _seconds(found.get("baseline", {}).get("inputs", {}).get("numerator")),
    }
    rows = []
    for name in ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "baseline"):
        section = sections.get(name)
        if section is None:
            continue
        ratio = found.get(name)
        limit = ratio and ratio["threshold"]
        verdict = "" if not ratio or ratio["pass"] is None else "pass" if ratio["pass"] else "FAIL"
        rows.append(
            (
                name,
                error_line(section["error"]) if "error" in section else measured[name],
                f"{ratio['value']:.3f}" if ratio else "-",
                f"<= {limit}" if limit else "-",
                verdict,
                section["run"]["date"],
            )
        )
    return format_table(("STEP", "MEASURED", "RATIO", "TARGET", "RESULT", "RUN"), rows)


def write_results(path: Path, machine: dict, sections: dict) -> dict[str, dict]:
    found = ratios(sections)
    record = {
        "machine": machine,
        "sections": sections,
        "ratios": found,
        "notes": {
            "measured": "numbers under each section's `measured` come from a real run",
            "derived": "`derived` and `ratios` are computed from measured numbers; P3's in-VM "
            "figure is derived (ratios.P3.inputs.in_vm_source says from what), not measured "
            "on a failing VM build",
            "runs": "each section's `run` says when and at which revision it was measured; a "
            "run with --only keeps the other sections of the previous results.json",
        },
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return found


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--only", help=f"comma-separated steps: {','.join(sorted(STEPS))}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--work-dir", type=Path, help="where the temporary folders go")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file")
    args = parser.parse_args(argv)
    if args.only:
        wanted = {s.strip().lower() for s in args.only.split(",") if s.strip()}
        known = {s.lower(): s for s in STEPS}
        unknown = sorted(wanted - set(known))
        if unknown or not wanted:
            parser.error(
                f"--only: unknown step(s) {', '.join(unknown) or '(none)'}; "
                f"use some of {', '.join(sorted(STEPS))}"
            )
        args.steps = [s for s in STEPS if s.lower() in wanted]
    else:
        args.steps = list(STEPS)
    needing = [s for s in NEEDS_P1_NOW if s in args.steps]
    if needing and "P1" not in args.steps:
        verb = "reuses" if len(needing) == 1 else "reuse"
        parser.error(f"{', '.join(needing)} {verb} P1's cache and delivery: add P1 to --only")
    return args


def previous_sections(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text()).get("sections", {})
    except (OSError, ValueError):
        return {}


def run_step(bench: Bench, step: str) -> dict:
    if step in ("P1", "P7"):
        section, built = cold_build(bench, step, DEMO if step == "P1" else BANK)
        if step == "P1":
            bench.p1 = built
        return section
    if step == "P3":
        return bench_p3(bench)
    if step == "P6":
        return bench_p6(bench)
    assert bench.p1 is not None
    makers = {"P2": bench_p2, "P4": bench_p4, "P5": bench_p5, "baseline": bench_baseline}
    return makers[step](bench, bench.p1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = previous_sections(args.results)
    if "P6" in args.steps and "P1" not in args.steps and "P1" not in sections:
        log(f"error: P6 compares with P1's build: add P1 to --only (no P1 in {args.results})")
        return 2
    channel = None
    if any(s in args.steps for s in NEEDS_CHANNEL):
        try:
            channel = demo_channel()
        except BenchError as error:
            log(f"error: {error}")
            return 2
        # The profile copies name the channel outside their folder: allow it in-process too.
        listed = (os.environ.get(ALLOWED_ROOTS_ENV_VAR), str(channel))
        os.environ[ALLOWED_ROOTS_ENV_VAR] = os.pathsep.join(p for p in listed if p)
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="factory-bench-", dir=args.work_dir))
    log(f"steps {', '.join(args.steps)}; temporary folders in {work}")
    bench = Bench(work, channel, run_stamp())
    machine = machine_facts()
    # P1's folder (cache, delivery) goes once the last step that reuses it is done.
    p1_users = [s for s in args.steps if s == "P1" or s in NEEDS_P1_NOW]
    failed: list[str] = []
    for step in args.steps:
        if step in NEEDS_P1_NOW and bench.p1 is None:
            log(f"{step}: skipped, P1 failed")
            continue
        try:
            section = run_step(bench, step)
        except Exception as error:  # recorded; the other steps still run
            log(f"{step}: FAILED: {error}")
            failed.append(step)
            section = {"error": str(error)}
        sections[step] = {**section, "run": bench.stamp}
        if args.keep or step in failed:
            continue
        if step != "P1":
            shutil.rmtree(work / step, ignore_errors=True)
        if p1_users and step == p1_users[-1] and "P1" not in failed:
            shutil.rmtree(work / "P1", ignore_errors=True)
    found = write_results(args.results, machine, sections)
    print(table(sections, found))
    print(f"results: {args.results}")
    if failed or args.keep:
        log(f"kept {work}" + (f" (failed: {', '.join(failed)}; logs inside)" if failed else ""))
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
