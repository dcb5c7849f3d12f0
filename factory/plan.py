"""`factory plan`: one job per profile (build it, then validate it) for a scheduler that
already exists: GitHub Actions, GitLab CI, Argo Workflows, Slurm, or plain JSON.

The plan is data first (`plan_profiles` returns the JSON document, its keys described in
docs/scheduling.md); every other format is rendered from that data. Computing it builds
nothing: it reads each profile and asks the layer store what it holds, as
`factory build --explain` does.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from factory import __version__
from factory.errors import ExitCode, FactoryError, ProfileError
from factory.host import HOST_RESERVED_MIB, VM_MIN_MEMORY_MIB

if TYPE_CHECKING:
    from factory.profile import LoadedProfile

PLAN_VERSION = 1  # bump when a key of the JSON document changes meaning
# Exit 6: this host lacks something the job needs (KVM, memory, disk, a tool); another host,
# or the same one later, may have it. Every other failure would fail again: fail at once.
RETRY_EXIT_CODES = (ExitCode.INFRASTRUCTURE,)
# Kubernetes stops a pod with SIGTERM when it drains a node or takes a spot node back; factory
# then exits 130 having published nothing, and Argo runs the job again on another node.
ARGO_RETRY_EXIT_CODES = (ExitCode.INFRASTRUCTURE, ExitCode.INTERRUPTED)
RETRIES = 2
RETRY_DELAY_S = 60  # between two tries on the same GitHub runner
RUNNER_LABELS = ("self-hosted", "linux", "x64", "kvm")
GPU_LABEL = "gpu"
KVM_RESOURCE = "devices.kubevirt.io/kvm"  # KubeVirt's device plugin: nodes with /dev/kvm
GPU_RESOURCE = "nvidia.com/gpu"


class PlanError(FactoryError):
    """The profiles cannot be planned together in the asked format."""

    exit_code = ExitCode.BAD_INPUT


# --------------------------------------------------------------------------- the plan (data)


def plan_profiles(profiles: list[Path], outputs: Path, plan_format: str = "json") -> dict:
    """The plan as its JSON document. Every profile is read (and the format's limits checked)
    before any layer is looked up, so a bad profile fails at once."""
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
                "commands": job_commands(shown, profile.name, str(outputs)),
            }
        )
    return {
        "plan": PLAN_VERSION,
        "factory": __version__,
        "outputs": str(outputs),
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


def job_commands(profile: str, name: str, outputs: str) -> list[list[str]]:
    return [
        ["factory", "build", profile, "--outputs", outputs],
        ["factory", "validate", f"{outputs}/{name}"],
    ]


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


# --------------------------------------------------------------------------- rendering


def render_plan(plan: dict, plan_format: str) -> str:
    """The plan in one of FORMATS: JSON as it is, or a scheduler's file rendered from it."""
    if plan_format not in RENDERERS:
        raise PlanError(f"--format {plan_format!r}: use one of {', '.join(RENDERERS)}")
    return RENDERERS[plan_format](plan)


def render_json(plan: dict) -> str:
    return json.dumps(plan, indent=2) + "\n"


def _header(plan: dict, plan_format: str, comment: str = "#") -> str:
    """Generated-file mark, and each job's needs, since runner labels cannot carry them."""
    lines = [
        f"Generated by `factory plan --format {plan_format}` (factory {plan['factory']}); "
        "plan again rather than edit.",
        "One job per profile: build, then validate; handed on only when validation passed.",
        f"Retried only on exit {_codes(_retry_codes(plan_format))}; see docs/scheduling.md.",
    ]
    for index, job in enumerate(plan["jobs"]):
        need = job["needs"]
        stored = sum(layer["hit"] for layer in job["layers"])
        lines.append(
            f"  {index}: {job['name']} ({job['profile']}): KVM preferred, "
            f"{'a GPU, ' if need['gpu'] else ''}{need['cpus']} CPUs, {need['memory_mib']} MiB, "
            f"{need['disk_gib']} GiB disk; {stored} of {len(job['layers'])} layers cached"
        )
    return "".join(f"{comment} {line}\n" for line in lines)


def _retry_codes(plan_format: str) -> tuple[ExitCode, ...]:
    return ARGO_RETRY_EXIT_CODES if plan_format == "argo" else RETRY_EXIT_CODES


def _codes(codes: tuple[ExitCode, ...]) -> str:
    return " or ".join(f"{int(code)} ({code.name.lower()})" for code in codes)


class _Dumper(yaml.SafeDumper):
    """Block style, scripts as literal blocks, no anchors."""

    def ignore_aliases(self, data: object) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # a list indented under its key


def _literal_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _literal_str)


def _yaml(document: dict) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


def _retry_in_place(command: str) -> str:
    """Shell that runs `command` and runs it again on this runner on exit 6 (GitHub cannot
    send a job elsewhere); a build that exits 6 has published nothing, so a new try is safe."""
    tries = RETRIES + 1
    codes = "|".join(str(int(code)) for code in RETRY_EXIT_CODES)
    return (
        f"for try in $(seq {tries}); do\n"
        "  status=0\n"
        f"  {command} || status=$?\n"
        f'  case "$status" in {codes}) ;; *) exit "$status" ;; esac\n'
        f'  if [ "$try" -eq {tries} ]; then exit "$status"; fi\n'
        f'  echo "::warning::exit $status: this runner lacks something the job needs; '
        f'try $((try + 1)) of {tries} in $FACTORY_RETRY_DELAY s"\n'
        '  sleep "$FACTORY_RETRY_DELAY"\n'
        "done\n"
    )


def render_github_actions(plan: dict) -> str:
    include = [
        {
            "name": job["name"],
            "profile": job["profile"],
            "runner": [*RUNNER_LABELS, *([GPU_LABEL] if job["needs"]["gpu"] else [])],
        }
        for job in plan["jobs"]
    ]
    delivery = "${{ env.OUTPUTS }}/${{ matrix.name }}"
    workflow = {
        "name": "factory deliveries",
        "on": {"workflow_dispatch": {}},
        "permissions": {"contents": "read"},
        "jobs": {
            "delivery": {
                "name": "${{ matrix.name }}",
                "runs-on": "${{ matrix.runner }}",
                "strategy": {"fail-fast": False, "matrix": {"include": include}},
                "env": {
                    "PROFILE": "${{ matrix.profile }}",
                    "NAME": "${{ matrix.name }}",
                    "OUTPUTS": plan["outputs"],
                    "FACTORY_RETRY_DELAY": RETRY_DELAY_S,
                },
                "defaults": {"run": {"shell": "bash"}},
                "steps": [
                    {"uses": "actions/checkout@v5"},
                    {
                        "name": "Set up factory",
                        "run": 'make setup\necho "$PWD/.venv/bin" >> "$GITHUB_PATH"\n',
                    },
                    {
                        "name": "Build",
                        "run": _retry_in_place('factory build "$PROFILE" --outputs "$OUTPUTS"'),
                    },
                    {
                        "name": "Validate",
                        "run": _retry_in_place('factory validate "$OUTPUTS/$NAME"'),
                    },
                    {
                        "name": "Upload the delivery",
                        "if": "success()",
                        "uses": "actions/upload-artifact@v6",
                        "with": {
                            "name": "${{ matrix.name }}",
                            "path": delivery,
                            "if-no-files-found": "error",
                        },
                    },
                ],
            }
        },
    }
    return _header(plan, "github-actions") + _yaml(workflow)


def render_gitlab_ci(plan: dict) -> str:
    """A job for the plain profiles and one for the GPU ones (tags cannot differ within one
    matrix), each written out whole so that GitLab's schema checks every key."""
    document = {}
    for job_name, gpu in (("delivery", False), ("delivery-gpu", True)):
        matrix = [
            {"PROFILE": job["profile"], "NAME": job["name"]}
            for job in plan["jobs"]
            if job["needs"]["gpu"] == gpu
        ]
        if not matrix:
            continue
        document[job_name] = {
            "stage": "build",
            "tags": ["kvm", *([GPU_LABEL] if gpu else [])],
            "parallel": {"matrix": matrix},
            "variables": {"OUTPUTS": plan["outputs"]},
            "before_script": ["make setup", 'export PATH="$PWD/.venv/bin:$PATH"'],
            "script": [
                'factory build "$PROFILE" --outputs "$OUTPUTS"',
                'factory validate "$OUTPUTS/$NAME"',
            ],
            "retry": {"max": RETRIES, "exit_codes": [int(code) for code in RETRY_EXIT_CODES]},
            "artifacts": {"name": "$NAME", "paths": ["$OUTPUTS/$NAME/"], "when": "on_success"},
        }
    return _header(plan, "gitlab-ci") + _yaml(document)


def _hand_on_script(attempt: str) -> str:
    """Shell for a scheduler that runs a job again from the start: each try builds into a
    folder of its own inside the outputs folder, and the delivery moves to OUTPUTS/NAME by
    one rename only once it passed validation. A retry never meets a half-made delivery."""
    return (
        "# Each try builds in a folder of its own: a retry never meets a half-made delivery.\n"
        f'attempt="{attempt}"\n'
        "status=0\n"
        'factory build "$PROFILE" --outputs "$attempt" || status=$?\n'
        'if [ "$status" -eq 0 ]; then\n'
        '  factory validate "$attempt/$NAME" || status=$?\n'
        "fi\n"
    )


_HAND_ON = (
    "\n# Hand the validated delivery on: one rename within the outputs folder.\n"
    'if [ "$status" -ne 0 ]; then\n'
    '  exit "$status"\n'
    "fi\n"
    'if ! mv -T "$attempt/$NAME" "$OUTPUTS/$NAME"; then\n'
    '  echo "error: $OUTPUTS/$NAME already exists; the validated delivery stays in '
    '$attempt/$NAME" >&2\n'
    "  exit 1\n"
    "fi\n"
    'rm -rf "$attempt"\n'
)


def render_argo(plan: dict) -> str:
    items = [
        {
            "profile": job["profile"],
            "name": job["name"],
            "cpus": str(job["needs"]["cpus"]),
            "memory": f"{job['needs']['memory_mib']}Mi",
            "gpus": "1" if job["needs"]["gpu"] else "0",
        }
        for job in plan["jobs"]
    ]
    parameters = ["profile", "name", "cpus", "memory", "gpus"]
    codes = ", ".join(str(int(code)) for code in ARGO_RETRY_EXIT_CODES)
    size = {
        "cpu": "{{inputs.parameters.cpus}}",
        "memory": "{{inputs.parameters.memory}}",
        KVM_RESOURCE: "1",
        GPU_RESOURCE: "{{inputs.parameters.gpus}}",
    }
    build = {
        "name": "build-and-validate",
        "inputs": {
            "parameters": [{"name": name} for name in parameters],
            "artifacts": [
                {
                    "name": "source",
                    "path": "/src",
                    "git": {
                        "repo": "{{workflow.parameters.repo}}",
                        "revision": "{{workflow.parameters.revision}}",
                    },
                }
            ],
        },
        "retryStrategy": {
            "limit": RETRIES,
            "retryPolicy": "OnFailure",
            "expression": f"asInt(lastRetry.exitCode) in [{codes}]",
            "affinity": {"nodeAntiAffinity": {}},  # another node, where one is free
        },
        "container": {
            "image": "{{workflow.parameters.image}}",
            "workingDir": "/src",
            "command": ["bash", "-c"],
            "args": [_hand_on_script("$OUTPUTS/.attempt-$POD_NAME") + _HAND_ON],
            "env": [
                {"name": "PROFILE", "value": "{{inputs.parameters.profile}}"},
                {"name": "NAME", "value": "{{inputs.parameters.name}}"},
                {"name": "OUTPUTS", "value": "/outputs"},
                {"name": "FACTORY_CACHE_DIR", "value": "/cache"},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            # The build mounts images, uses loop devices, FUSE and chroot, and boots QEMU.
            "securityContext": {"privileged": True},
            "resources": {"requests": size, "limits": size},
            "volumeMounts": [
                {"name": "cache", "mountPath": "/cache"},
                {"name": "outputs", "mountPath": "/outputs"},
            ],
        },
    }
    workflow = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"generateName": "factory-deliveries-"},
        "spec": {
            "entrypoint": "deliveries",
            "arguments": {
                "parameters": [
                    {"name": "image"},  # factory and its tools installed (make setup)
                    {"name": "repo"},  # the git repository that holds the profiles
                    {"name": "revision", "value": "HEAD"},
                ]
            },
            "volumes": [
                {"name": "cache", "persistentVolumeClaim": {"claimName": "factory-cache"}},
                {"name": "outputs", "persistentVolumeClaim": {"claimName": "factory-outputs"}},
            ],
            "templates": [
                {
                    "name": "deliveries",
                    "steps": [
                        [
                            {
                                "name": "delivery",
                                "template": "build-and-validate",
                                "arguments": {
                                    "parameters": [
                                        {"name": name, "value": f"{{{{item.{name}}}}}"}
                                        for name in parameters
                                    ]
                                },
                                "withItems": items,
                            }
                        ]
                    ],
                },
                build,
            ],
        },
    }
    return _header(plan, "argo") + _yaml(workflow)


def render_slurm(plan: dict) -> str:
    jobs = plan["jobs"]
    needs = [job["needs"] for job in jobs]
    _one_kind_of_node([job["name"] for job in jobs], needs)
    gpu = needs[0]["gpu"]
    codes = "|".join(str(int(code)) for code in RETRY_EXIT_CODES)
    directives = [
        "--job-name=factory-deliveries",
        f"--array=0-{len(jobs) - 1}",
        f"--cpus-per-task={max(n['cpus'] for n in needs)}",
        f"--mem={max(n['memory_mib'] for n in needs)}M",
        *(["--gres=gpu:1"] if gpu else []),
        "--requeue",
        "--output=factory-%A_%a.out",
    ]
    profiles = " ".join(shlex.quote(job["profile"]) for job in jobs)
    names = " ".join(shlex.quote(job["name"]) for job in jobs)
    body = (
        "set -u\n\n"
        "# Task N builds and validates the Nth profile.\n"
        f"profiles=({profiles})\n"
        f"names=({names})\n"
        'task="${SLURM_ARRAY_TASK_ID:?submit this script with sbatch}"\n'
        'PROFILE="${profiles[$task]}"\n'
        'NAME="${names[$task]}"\n'
        f'OUTPUTS="${{FACTORY_OUTPUTS:-{_shell_default(plan["outputs"])}}}"\n'
        + _hand_on_script("$OUTPUTS/.attempt-${SLURM_ARRAY_JOB_ID}_$task.${SLURM_RESTART_COUNT:-0}")
        + "\n# Another node may have what this one lacks: requeue (Slurm counts the restarts).\n"
        + f'case "$status" in {codes})\n'
        f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {RETRIES} ]; then\n'
        '    echo "exit $status: this node lacks something the job needs; requeued" >&2\n'
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_$task"\n'
        "  fi\n"
        "  ;;\n"
        "esac\n" + _HAND_ON
    )
    return (
        "#!/bin/bash\n"
        + _header(plan, "slurm")
        + "# Submit: sbatch FILE (set FACTORY_OUTPUTS to move the deliveries elsewhere).\n"
        + "".join(f"#SBATCH {directive}\n" for directive in directives)
        + body
    )


def _shell_default(value: str) -> str:
    """A value for ${VAR:-value}: quoted for the shell, inside double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


RENDERERS: dict[str, Callable[[dict], str]] = {
    "json": render_json,
    "github-actions": render_github_actions,
    "gitlab-ci": render_gitlab_ci,
    "argo": render_argo,
    "slurm": render_slurm,
}
FORMATS = tuple(RENDERERS)  # json, github-actions, gitlab-ci, argo, slurm
