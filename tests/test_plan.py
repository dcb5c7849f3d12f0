"""`factory plan`: one build-and-validate job per profile, as JSON or as a file GitHub Actions,
GitLab CI, Argo Workflows or Slurm runs. Each file is checked by the tool that scheduler's
users trust (actionlint, GitLab's CI schema, Argo's own models, bash -n and shellcheck), each
checker first shown to reject a broken copy, and the jobs' shell is run against a stand-in
`factory` to see it retry on exit 6 only and hand on a delivery only once validated."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from factory.errors import ExitCode
from factory.host import HOST_RESERVED_MIB, VM_MIN_MEMORY_MIB
from factory.layers import LayerStore
from factory.profile import load_profile
from tests.conftest import REPO, demo_variant, run_factory

DEMO = "profiles/demo.yaml"
GPU_DEMO = "profiles/demo-gpu.yaml"
BAD_PROFILE = "tests/profiles/bad/04-unknown-top-key.yaml"
VENV_BIN = Path(sys.executable).parent
# The GitHub runner's shell for `shell: bash`.
GITHUB_BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is missing: pip install -e '.[test]' (or apt-get install {name})"
    return found


@pytest.fixture(scope="module")
def plans(demo_channel, tmp_path_factory) -> dict:
    """Each format planned once by the real CLI, side by side: the demo and its GPU variant
    (the json on standard output, the schedulers' files with -o), and for Slurm, which wants
    one kind of node per array, the demo with a second plain profile, and the GPU demo alone."""
    work = tmp_path_factory.mktemp("plan")
    outputs = str(work / "deliveries")
    second = demo_variant(work / "second", lambda profile: profile.update(project="second"))
    runs = {
        "json": ("json", DEMO, GPU_DEMO),
        "github-actions": ("github-actions", DEMO, GPU_DEMO),
        "gitlab-ci": ("gitlab-ci", DEMO, GPU_DEMO),
        "argo": ("argo", DEMO, GPU_DEMO),
        "slurm": ("slurm", DEMO, str(second)),
        "slurm-gpu": ("slurm", GPU_DEMO),
    }

    def plan(run: str) -> subprocess.CompletedProcess:
        plan_format, *profiles = runs[run]
        target = [] if run == "json" else ["-o", str(work / f"{run}.plan")]
        args = ["plan", *profiles, "--format", plan_format, "--outputs", outputs, *target]
        return run_factory(*args, timeout=900)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(runs, pool.map(plan, runs), strict=True))
    texts = {}
    for run, result in results.items():
        assert result.returncode == 0, f"factory plan ({run}):\n{result.stdout}{result.stderr}"
        if run == "json":
            texts[run] = result.stdout
        else:
            assert f"{work / f'{run}.plan'}" in result.stdout
            texts[run] = (work / f"{run}.plan").read_text()
    return {
        "texts": texts,
        "json": json.loads(texts["json"]),
        "outputs": outputs,
        "second": second,
    }


# --------------------------------------------------------------------------- json


def test_json_gives_each_profile_its_delivery_layers_needs_and_commands(plans):
    plan = plans["json"]
    outputs = plans["outputs"]
    assert plan["plan"] == 1 and plan["outputs"] == outputs
    assert plan["retry_exit_codes"] == [ExitCode.INFRASTRUCTURE]
    assert plan["exit_codes"] == {code.name.lower(): int(code) for code in ExitCode}
    assert [job["profile"] for job in plan["jobs"]] == [DEMO, GPU_DEMO]
    for job, path in zip(plan["jobs"], (DEMO, GPU_DEMO), strict=True):
        loaded = load_profile(REPO / path)
        resources = loaded.profile.resources
        assert job["name"] == loaded.name
        assert job["delivery"] == f"{outputs}/{loaded.name}"
        assert job["commands"] == [
            ["factory", "build", path, "--outputs", outputs],
            ["factory", "validate", f"{outputs}/{loaded.name}"],
        ]
        vm = resources.build_memory or max(resources.memory, VM_MIN_MEMORY_MIB)
        assert job["needs"] == {
            "kvm": True,
            "gpu": loaded.profile.gpu is not None,
            "cpus": resources.cpus,
            "memory_mib": vm + HOST_RESERVED_MIB,
            "build_vm_memory_mib": vm,
            "disk_gib": resources.disk,
            "cpu_baseline": loaded.profile.cpu_baseline,
        }
    demo, gpu = plan["jobs"]
    assert (demo["needs"]["gpu"], gpu["needs"]["gpu"]) == (False, True)
    assert demo["needs"]["disk_gib"] != gpu["needs"]["disk_gib"]  # 8 and 10: read, not assumed


def test_json_layers_are_what_the_layer_store_holds(plans):
    store = LayerStore()
    for job in plans["json"]["jobs"]:
        names = [layer["name"] for layer in job["layers"]]
        assert names[0] == "base" and names[-1] == "client" and "env demo" in names, names
        assert all(re.fullmatch(r"[0-9a-f]{64}", layer["key"]) for layer in job["layers"])
        assert job["cached"] == all(layer["hit"] for layer in job["layers"])
        below = job["layers"][0]["hit"]  # the base image lives outside the layer store
        for layer in job["layers"][1:]:
            stored = (
                store.manifest(layer["key"]) is not None
                and (store.root / f"{layer['key']}.qcow2").is_file()
            )
            assert layer["hit"] == (stored and below), layer
            assert (layer["why"] == "stored") == layer["hit"], layer
            below = layer["hit"]
    demo, gpu = plans["json"]["jobs"]
    assert demo["layers"][-1]["key"] != gpu["layers"][-1]["key"]


# --------------------------------------------------------------------------- github actions


def _actionlint(folder: Path, workflow: str) -> subprocess.CompletedProcess:
    path = folder / ".github" / "workflows" / "factory.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(workflow)
    return subprocess.run(
        [_tool("actionlint"), "-no-color", str(path.relative_to(folder))],
        cwd=folder,
        capture_output=True,
        text=True,
    )


def test_github_workflow_passes_actionlint_which_rejects_a_broken_copy(plans, tmp_path):
    text = plans["texts"]["github-actions"]
    assert text.startswith("# Generated by `factory plan --format github-actions`")
    broken = _actionlint(tmp_path / "broken", text.replace("matrix.profile", "matrix.profil"))
    assert broken.returncode != 0 and "profil" in broken.stdout, broken.stdout
    checked = _actionlint(tmp_path / "plan", text)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_github_matrix_asks_for_kvm_and_a_gpu_label_where_the_profile_has_a_gpu(plans):
    workflow = yaml.safe_load(plans["texts"]["github-actions"])
    job = workflow["jobs"]["delivery"]
    assert job["strategy"]["fail-fast"] is False
    assert job["runs-on"] == "${{ matrix.runner }}"
    include = job["strategy"]["matrix"]["include"]
    assert [(e["name"], e["profile"]) for e in include] == [
        (j["name"], j["profile"]) for j in plans["json"]["jobs"]
    ]
    for entry, planned in zip(include, plans["json"]["jobs"], strict=True):
        assert "kvm" in entry["runner"] and "self-hosted" in entry["runner"]
        assert ("gpu" in entry["runner"]) == planned["needs"]["gpu"]
    steps = job["steps"]
    names = [step.get("name") or step["uses"].split("@")[0] for step in steps]
    assert names == [
        "actions/checkout",
        "Set up factory",
        "Build",
        "Validate",
        "Upload the delivery",
    ]
    upload = steps[-1]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "success()"
    assert upload["with"]["path"] == "${{ env.OUTPUTS }}/${{ matrix.name }}"


def _fake_factory(folder: Path, codes: list[int]) -> dict[str, str]:
    """A stand-in `factory` on PATH that logs its arguments and exits with the next code;
    a build that exits 0 leaves a delivery in its --outputs folder. And a logging
    `scontrol`."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    (folder / "codes").write_text("".join(f"{code}\n" for code in codes))
    fake = bin_dir / "factory"
    fake.write_text(
        "#!/bin/bash\n"
        'echo "factory $*" >> "$FAKE_LOG"\n'
        'code=$(head -n 1 "$FAKE_CODES"); sed -i 1d "$FAKE_CODES"\n'
        'if [ "$1" = build ] && [ "${code:-0}" = 0 ]; then\n'
        '  mkdir -p "$4/$FAKE_DELIVERY" && echo built > "$4/$FAKE_DELIVERY/SHA256SUMS"\n'
        "fi\n"
        'exit "${code:-0}"\n'
    )
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for tool in (fake, scontrol):
        tool.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(folder / "log"),
        "FAKE_CODES": str(folder / "codes"),
    }


def _log(folder: Path) -> list[str]:
    log = folder / "log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize(
    ("codes", "status", "tries"),
    [
        ([0], 0, 1),
        ([ExitCode.INFRASTRUCTURE, 0], 0, 2),
        ([ExitCode.INFRASTRUCTURE] * 3, ExitCode.INFRASTRUCTURE, 3),
        ([ExitCode.BUILD_FAILED], ExitCode.BUILD_FAILED, 1),
        ([ExitCode.BAD_INPUT, 0], ExitCode.BAD_INPUT, 1),
        ([ExitCode.INTERRUPTED, 0], ExitCode.INTERRUPTED, 1),
    ],
)
def test_github_build_step_tries_again_only_on_exit_6(plans, tmp_path, codes, status, tries):
    job = yaml.safe_load(plans["texts"]["github-actions"])["jobs"]["delivery"]
    build = next(step for step in job["steps"] if step.get("name") == "Build")
    env = {
        **os.environ,
        **_fake_factory(tmp_path, [int(code) for code in codes]),
        "PROFILE": DEMO,
        "OUTPUTS": "out",
        "NAME": "demo_hello_v1",
        "FAKE_DELIVERY": "demo_hello_v1",
        "FACTORY_RETRY_DELAY": "0",
    }
    ran = subprocess.run(
        [*GITHUB_BASH, "-c", build["run"]], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert ran.returncode == status, ran.stdout + ran.stderr
    assert _log(tmp_path) == [f"factory build {DEMO} --outputs out"] * tries
    assert ran.stdout.count("::warning::") == tries - 1
    assert job["env"]["FACTORY_RETRY_DELAY"] > 0  # the workflow itself waits between tries


# --------------------------------------------------------------------------- gitlab ci


def _gitlab_schema_check(path: Path, document: str) -> subprocess.CompletedProcess:
    path.write_text(document)
    return subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.gitlab-ci", str(path)],
        capture_output=True,
        text=True,
    )


def test_gitlab_ci_matches_gitlabs_schema_which_rejects_a_broken_copy(plans, tmp_path):
    text = plans["texts"]["gitlab-ci"]
    broken = _gitlab_schema_check(tmp_path / "broken.yml", text.replace("max: 2", "max: 3"))
    assert broken.returncode != 0 and "greater than the maximum" in broken.stdout, broken.stdout
    checked = _gitlab_schema_check(tmp_path / ".gitlab-ci.yml", text)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_gitlab_ci_retries_only_on_exit_6_and_tags_gpu_jobs(plans):
    document = yaml.safe_load(plans["texts"]["gitlab-ci"])
    assert sorted(document) == ["delivery", "delivery-gpu"]
    jobs = {job["name"]: job for job in plans["json"]["jobs"]}
    for job_name, gpu in (("delivery", False), ("delivery-gpu", True)):
        job = document[job_name]
        assert job["retry"] == {"max": 2, "exit_codes": [ExitCode.INFRASTRUCTURE]}
        assert job["tags"] == (["kvm", "gpu"] if gpu else ["kvm"])
        assert job["script"] == [
            'factory build "$PROFILE" --outputs "$OUTPUTS"',
            'factory validate "$OUTPUTS/$NAME"',
        ]
        assert job["artifacts"]["when"] == "on_success"
        for entry in job["parallel"]["matrix"]:
            assert jobs[entry["NAME"]]["profile"] == entry["PROFILE"]
            assert jobs[entry["NAME"]]["needs"]["gpu"] is gpu
    matrices = [e["NAME"] for j in document.values() for e in j["parallel"]["matrix"]]
    assert sorted(matrices) == sorted(jobs)


# --------------------------------------------------------------------------- argo


def _argo_checked(document: dict) -> dict:
    """Argo's Workflow model (hera's, generated from Argo's OpenAPI schema) reads the
    document, and writing it back gives it unchanged: a key the model does not know would be
    dropped, a wrong type raises."""
    from hera.workflows.models import Workflow

    workflow = Workflow.model_validate(document)
    return workflow.model_dump(by_alias=True, exclude_none=True, mode="json")


def test_argo_workflow_is_argos_which_rejects_broken_copies(plans):
    from pydantic import ValidationError

    document = yaml.safe_load(plans["texts"]["argo"])
    assert _argo_checked(document) == document
    wrong_type = copy.deepcopy(document)
    wrong_type["spec"]["templates"][1]["retryStrategy"]["limit"] = [2]
    with pytest.raises(ValidationError, match="limit"):
        _argo_checked(wrong_type)
    misspelt = copy.deepcopy(document)
    container = misspelt["spec"]["templates"][1]["container"]
    container["resource"] = container.pop("resources")
    assert _argo_checked(misspelt) != misspelt


def test_argo_asks_for_kvm_and_gpus_and_retries_only_on_6_and_130(plans):
    spec = yaml.safe_load(plans["texts"]["argo"])["spec"]
    templates = {template["name"]: template for template in spec["templates"]}
    (step,) = templates[spec["entrypoint"]]["steps"][0]
    items = {item["name"]: item for item in step["withItems"]}
    for job in plans["json"]["jobs"]:
        item = items.pop(job["name"])
        assert item["profile"] == job["profile"]
        assert item["memory"] == f"{job['needs']['memory_mib']}Mi"
        assert item["gpus"] == ("1" if job["needs"]["gpu"] else "0")
    assert not items
    build = templates[step["template"]]
    limits = build["container"]["resources"]["limits"]
    assert limits["devices.kubevirt.io/kvm"] == "1"
    assert limits["nvidia.com/gpu"] == "{{inputs.parameters.gpus}}"
    assert build["container"]["resources"]["requests"] == limits
    retry = build["retryStrategy"]
    codes = re.fullmatch(r"asInt\(lastRetry\.exitCode\) in \[([0-9, ]+)\]", retry["expression"])
    assert codes, retry["expression"]
    assert [int(c) for c in codes.group(1).split(",")] == [
        ExitCode.INFRASTRUCTURE,
        ExitCode.INTERRUPTED,
    ]


# --------------------------------------------------------------------------- slurm


def test_slurm_script_passes_bash_and_shellcheck_which_reject_broken_copies(plans, tmp_path):
    script = plans["texts"]["slurm"]
    unclosed = tmp_path / "unclosed.sh"
    unclosed.write_text(script.replace("\nfi\n", "\n", 1))
    assert subprocess.run(["bash", "-n", str(unclosed)], capture_output=True).returncode != 0
    unquoted = tmp_path / "unquoted.sh"
    unquoted.write_text(script.replace('build "$PROFILE"', "build $PROFILE"))
    linted = subprocess.run([_tool("shellcheck"), str(unquoted)], capture_output=True, text=True)
    assert linted.returncode != 0 and "SC2086" in linted.stdout, linted.stdout
    for run in ("slurm", "slurm-gpu"):
        path = tmp_path / f"{run}.sh"
        path.write_text(plans["texts"][run])
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        linted = subprocess.run([_tool("shellcheck"), str(path)], capture_output=True, text=True)
        assert linted.returncode == 0, linted.stdout


def _directives(script: str) -> list[str]:
    return re.findall(r"^#SBATCH (\S+)$", script, flags=re.MULTILINE)


def test_slurm_array_has_a_task_per_profile_and_a_gpu_only_for_gpu_images(plans):
    def memory(*profiles: Path) -> str:
        resources = [load_profile(path).profile.resources for path in profiles]
        vm = max(r.build_memory or max(r.memory, VM_MIN_MEMORY_MIB) for r in resources)
        return f"--mem={vm + HOST_RESERVED_MIB}M"

    plain = _directives(plans["texts"]["slurm"])
    assert "--array=0-1" in plain and "--requeue" in plain
    assert memory(REPO / DEMO, plans["second"]) in plain
    assert not any(d.startswith("--gres") for d in plain)
    gpu = _directives(plans["texts"]["slurm-gpu"])
    assert "--array=0-0" in gpu and "--gres=gpu:1" in gpu
    assert memory(REPO / GPU_DEMO) in gpu


@pytest.mark.parametrize(
    ("codes", "restarts", "status", "requeued"),
    [
        ([0, 0], 0, 0, False),
        ([ExitCode.INFRASTRUCTURE], 0, ExitCode.INFRASTRUCTURE, True),
        ([0, ExitCode.INFRASTRUCTURE], 1, ExitCode.INFRASTRUCTURE, True),
        ([ExitCode.INFRASTRUCTURE], 2, ExitCode.INFRASTRUCTURE, False),
        ([0, ExitCode.VALIDATION_FAILED], 0, ExitCode.VALIDATION_FAILED, False),
        ([ExitCode.CONFLICT], 0, ExitCode.CONFLICT, False),
    ],
)
def test_slurm_task_builds_its_profile_and_requeues_only_on_exit_6(
    plans, tmp_path, codes, restarts, status, requeued
):
    script = tmp_path / "plan.sh"
    script.write_text(plans["texts"]["slurm"])
    second = load_profile(plans["second"])
    outputs = tmp_path / "deliveries"
    env = {
        **os.environ,
        **_fake_factory(tmp_path, [int(code) for code in codes]),
        "SLURM_ARRAY_JOB_ID": "77",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_RESTART_COUNT": str(restarts),
        "FACTORY_OUTPUTS": str(outputs),
        "FAKE_DELIVERY": second.name,
    }
    ran = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert ran.returncode == status, ran.stdout + ran.stderr
    attempt = outputs / f".attempt-77_1.{restarts}"
    log = _log(tmp_path)
    assert log[0] == f"factory build {plans['second']} --outputs {attempt}"
    assert ("scontrol requeue 77_1" in log) is requeued
    delivered = outputs / second.name
    if status == 0:
        assert log[1] == f"factory validate {attempt}/{second.name}"
        assert (delivered / "SHA256SUMS").read_text() == "built\n"
        assert not attempt.exists()
    else:
        assert not delivered.exists()


@pytest.mark.parametrize("current", [True, False])
def test_slurm_task_skips_a_current_delivery_and_never_replaces_one(plans, tmp_path, current):
    """A delivery already there that `factory verify --profile` finds current is a cache hit:
    the task builds nothing. One that is not current is never replaced: the new build stays
    in its attempt folder and the task fails."""
    script = tmp_path / "plan.sh"
    script.write_text(plans["texts"]["slurm"])
    name = load_profile(REPO / DEMO).name
    outputs = tmp_path / "deliveries"
    (outputs / name).mkdir(parents=True)
    (outputs / name / "SHA256SUMS").write_text("delivered before\n")
    env = {
        **os.environ,
        **_fake_factory(tmp_path, [0] if current else [1, 0, 0]),
        "SLURM_ARRAY_JOB_ID": "5",
        "SLURM_ARRAY_TASK_ID": "0",
        "FACTORY_OUTPUTS": str(outputs),
        "FAKE_DELIVERY": name,
    }
    ran = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    log = _log(tmp_path)
    assert log[0] == f"factory verify {outputs / name} --profile {DEMO}"
    assert (outputs / name / "SHA256SUMS").read_text() == "delivered before\n"
    if current:
        assert ran.returncode == 0 and "cache hit" in ran.stdout, ran.stdout + ran.stderr
        assert log == log[:1] and not list(outputs.glob(".attempt-*"))
        return
    assert ran.returncode == 1 and "already exists" in ran.stderr
    assert (outputs / ".attempt-5_0.0" / name / "SHA256SUMS").is_file()  # kept, not lost


def test_a_plan_that_validates_some_groups_says_so_in_every_command(demo_channel, tmp_path):
    """`--only`: each job validates those groups, and only a delivery validated for them at
    least is skipped as current (factory verify --only)."""
    data = json.loads(run_factory("plan", DEMO, "--only", "lock,env", check=True).stdout)
    assert data["validate_only"] == ["env", "lock"]
    job = data["jobs"][0]
    assert job["commands"][1][-2:] == job["skip_when"][-2:] == ["--only", "env,lock"]
    script = tmp_path / "plan.sh"
    run_factory("plan", DEMO, "--only", "env,lock", "--format", "slurm", "-o", str(script),
                check=True)  # fmt: skip
    text = script.read_text()
    assert 'factory validate "$attempt/$NAME" --only env,lock ||' in text
    assert 'factory verify "$OUTPUTS/$NAME" --profile "$PROFILE" --only env,lock;' in text


# --------------------------------------------------------------------------- bad input


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    target = tmp_path / "plan.out"
    cases = {
        "no profile": (["plan"], "PROFILES"),
        "bad profile": (["plan", DEMO, BAD_PROFILE], "04-unknown-top-key.yaml"),
        "missing profile": (["plan", "profiles/nope.yaml"], "profiles/nope.yaml"),
        "unknown format": (["plan", DEMO, "--format", "jenkins"], "jenkins"),
        "same delivery twice": (["plan", DEMO, DEMO], "both make the delivery demo_hello_v1"),
        "unknown check group": (
            ["plan", DEMO, "--only", "env,nope"],
            "--only: unknown group(s) nope",
        ),
        "gpu and plain in one slurm array": (
            ["plan", DEMO, GPU_DEMO, "--format", "slurm"],
            "demo_hello_gpu_v1 is a GPU image and demo_hello_v1 is not",
        ),
    }
    for case, (args, named) in cases.items():
        result = run_factory(*args, "-o", str(target), timeout=120)
        assert result.returncode == ExitCode.BAD_INPUT, (case, result.stderr)
        assert named in _one_error_line(result), case
        assert result.stdout == "" and not target.exists(), case
