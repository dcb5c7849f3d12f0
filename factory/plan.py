"""`factory plan`: one job per profile (build it, then validate it) for a scheduler that
already exists: GitHub Actions, GitLab CI, Argo Workflows, Slurm, or plain JSON.

The plan is data first (`plan_profiles` returns the JSON document, its keys described in
docs/scheduling.md); every other format is rendered from that data. Computing it builds
nothing: it reads each profile and asks the layer store what it holds, as
`factory build --explain` does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from factory import __version__
from factory.errors import ExitCode, FactoryError, ProfileError
from factory.host import HOST_RESERVED_MIB, VM_MIN_MEMORY_MIB

if TYPE_CHECKING:
    from factory.profile import LoadedProfile

PLAN_VERSION = 1  # bump when a key of the JSON document changes meaning
# Exit 6: this host lacks something the job needs (KVM, memory, disk, a tool); another host,
# or the same one later, may have it. Every other failure would fail again: fail at once.
RETRY_EXIT_CODES = (ExitCode.INFRASTRUCTURE,)


class PlanError(FactoryError):
    """The profiles cannot be planned together in the asked format."""

    exit_code = ExitCode.BAD_INPUT


# --------------------------------------------------------------------------- the plan (data)


def plan_profiles(
    profiles: list[Path],
    outputs: Path,
    plan_format: str = "json",
    validate_only: list[str] | None = None,
) -> dict:
    """The plan as its JSON document. Every profile is read (and the format's limits checked)
    before any layer is looked up, so a bad profile fails at once. `validate_only` names the
    groups of checks each job validates (None: all of them)."""
    from factory.pipeline import BuildOptions, explain_build
    from factory.profile import load_profile

    loaded = [load_profile(path) for path in profiles]
    _refuse_duplicate_deliveries(loaded)
    needs = [job_needs(profile) for profile in loaded]
    check = FORMAT_CHECKS.get(plan_format)
    if check:
        check([p.name for p in loaded], needs)
    options = BuildOptions(outputs=outputs)
    jobs = []
    for path, profile, need in zip(profiles, loaded, needs, strict=True):
        shown = _shown_path(path)
        layers = [
            {"name": s.layer.name, "key": s.layer.key, "hit": s.hit, "why": s.why}
            for s in explain_build(profile, options)
        ]
        jobs.append(
            {
                "name": profile.name,
                "profile": shown,
                "delivery": f"{outputs}/{profile.name}",
                "cached": all(layer["hit"] for layer in layers),
                "layers": layers,
                "needs": need,
                "commands": job_commands(shown, profile.name, str(outputs), validate_only),
                # Exit 0: the delivery there is current and validated; skip the job.
                "skip_when": [
                    "factory",
                    "verify",
                    f"{outputs}/{profile.name}",
                    "--profile",
                    shown,
                    *only_arguments(validate_only),
                ],
            }
        )
    return {
        "plan": PLAN_VERSION,
        "factory": __version__,
        "outputs": str(outputs),
        "validate_only": validate_only,
        "retry_exit_codes": [int(code) for code in RETRY_EXIT_CODES],
        "exit_codes": {code.name.lower(): int(code) for code in ExitCode},
        "jobs": jobs,
    }


def job_needs(loaded: LoadedProfile) -> dict:
    """What a job's host must give it. The build and validation VMs get the profile's memory
    (or resources.build_memory) when the host can give it, and the host keeps
    HOST_RESERVED_MIB besides for packer and the host-side install: ask for both, since a
    scheduler's limit is not what the VM sizing reads (/proc/meminfo)."""
    resources = loaded.profile.resources
    vm_mib = resources.build_memory or max(resources.memory, VM_MIN_MEMORY_MIB)
    return {
        # Preferred, not required: KVM where the host's probe boots a kernel, else TCG, which
        # works everywhere but emulates the system layer and the validation boot (slow).
        "kvm": True,
        "gpu": loaded.profile.gpu is not None,
        "cpus": resources.cpus,
        "memory_mib": vm_mib + HOST_RESERVED_MIB,
        "build_vm_memory_mib": vm_mib,
        "disk_gib": resources.disk,
        # Under KVM the validation boots at this level, so the host's CPU must have it.
        "cpu_baseline": loaded.profile.cpu_baseline,
    }


def job_commands(
    profile: str, name: str, outputs: str, validate_only: list[str] | None = None
) -> list[list[str]]:
    return [
        ["factory", "build", profile, "--outputs", outputs],
        ["factory", "validate", f"{outputs}/{name}", *only_arguments(validate_only)],
    ]


def only_arguments(validate_only: list[str] | None) -> list[str]:
    """`--only GROUPS` for a plan that validates some groups of checks, else nothing."""
    return ["--only", ",".join(validate_only)] if validate_only else []


def _shown_path(path: Path) -> str:
    """The profile as the jobs name it: relative to where the plan runs (the repository's
    root, which the jobs check out), absolute only when it lies outside."""
    absolute = path.expanduser().absolute()
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(absolute)


def _refuse_duplicate_deliveries(loaded: list[LoadedProfile]) -> None:
    seen: dict[str, LoadedProfile] = {}
    for profile in loaded:
        first = seen.setdefault(profile.name, profile)
        if first is not profile:
            raise ProfileError(
                f"{first.path} and {profile.path} both make the delivery {profile.name}; "
                "plan each delivery once (or bump `version` in one of them)"
            )


def _one_kind_of_node(names: list[str], needs: list[dict]) -> None:
    """A Slurm job array asks one size of node for all its tasks."""
    gpu = {need["gpu"] for need in needs}
    if len(gpu) > 1:
        with_gpu = next(n for n, need in zip(names, needs, strict=True) if need["gpu"])
        without = next(n for n, need in zip(names, needs, strict=True) if not need["gpu"])
        raise PlanError(
            f"--format slurm: {with_gpu} is a GPU image and {without} is not, but one job "
            "array asks the same node for every task; plan the GPU profiles and the others "
            "into two scripts"
        )


FORMAT_CHECKS: dict[str, Callable[[list[str], list[dict]], None]] = {"slurm": _one_kind_of_node}
