"""Jupyter: the service runs unprivileged on 127.0.0.1 and wants its first-boot token; every
environment is a kernel that runs the environment's own python, and every sample notebook runs
headless on the kernel it names."""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath

from factory.image_layout import CONDA_ENVS, JUPYTER_ENV_PREFIX, SAMPLES_DIR
from factory.profile.paths import notebook_kernel
from factory.validate.context import (
    SKIPPED,
    CheckContext,
    CheckResult,
    jupyter_token,
    quote,
    result,
    unit_user,
)

JUPYTER_BIN = JUPYTER_ENV_PREFIX / "bin"
NOTEBOOK_RUNNER = r"""
import sys, nbclient, nbformat
notebook = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(notebook, timeout=1200, kernel_name=sys.argv[2]).execute()
print(f"{len(notebook.cells)} cells ran")
"""
# A first boot may still be starting the service; checks wait this long for it.
START_SECONDS = 300


def http_status_command(url: str, headers_on_stdin: bool = False) -> str:
    """curl printing only the HTTP status of a GET. With headers_on_stdin, curl reads request
    headers from its stdin (-H @-), so a token never appears on a command line (ps, auditd)."""
    return f"curl -s -o /dev/null -w '%{{http_code}}' {'-H @- ' if headers_on_stdin else ''}{url}"


def check_jupyter(ctx: CheckContext) -> list[CheckResult]:
    jupyter = ctx.loaded.profile.jupyter
    group = "jupyter"
    if not jupyter.enabled:
        return [
            CheckResult(
                "jupyter: disabled in profile", SKIPPED, "jupyter.enabled is false", group=group
            )
        ]
    results = []
    deadline = time.monotonic() + START_SECONDS
    status = ""
    while time.monotonic() < deadline:
        status = ctx.target.run("systemctl is-active jupyter.service").stdout.strip()
        if status not in ("activating", "inactive", ""):
            break
        time.sleep(5)
    results.append(
        result("jupyter: service active", status == "active", f"is-active: {status}", group)
    )
    user = unit_user(ctx, "jupyter")
    results.append(
        result(
            "jupyter: runs as a non-root user",
            user not in ("", "root"),
            f"process user: {user or 'none'}",
            group,
        )
    )
    url = f"http://127.0.0.1:{jupyter.port}/api/status"
    answer = ""
    while time.monotonic() < deadline:
        answer = ctx.target.run(http_status_command(url)).stdout.strip()
        if answer in ("200", "403"):
            break
        time.sleep(5)
    results.append(
        result(
            "jupyter: answers on 127.0.0.1 and wants a token",
            answer == "403",
            f"GET /api/status without token -> HTTP {answer or 'no answer'}",
            group,
        )
    )
    authorised = ctx.target.run(
        http_status_command(url, headers_on_stdin=True),
        stdin=f"Authorization: token {jupyter_token(ctx)}\n",
    ).stdout.strip()
    results.append(
        result(
            "jupyter: answers with the first-boot token",
            authorised == "200",
            f"GET /api/status with token -> HTTP {authorised}",
            group,
        )
    )
    listen = ctx.target.run(f"ss -Htln 'sport = :{jupyter.port}'").stdout
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listen.splitlines() if line}
    results.append(
        result(
            "jupyter: bound to 127.0.0.1 only",
            addresses == {"127.0.0.1"},
            f"listening on {sorted(addresses) or 'nothing'}",
            group,
        )
    )
    return results


def kernel_problems(specs: dict, environments: list[str]) -> list[str]:
    """What is wrong with the environments' kernels: a missing kernel, or one that starts
    another python than its environment's own."""
    problems = []
    for env in environments:
        try:
            python = PurePosixPath(specs[env]["spec"]["argv"][0])
        except (KeyError, IndexError, TypeError):
            problems.append(f"no kernel {env}")
            continue
        if python.parent != CONDA_ENVS / env / "bin" or not python.name.startswith("python"):
            problems.append(f"kernel {env} runs {python}, not {CONDA_ENVS / env}/bin/python")
    return problems


def check_kernels_and_samples(ctx: CheckContext) -> list[CheckResult]:
    """Every environment is a Jupyter kernel on its own python; every sample notebook runs
    headless on the kernel its metadata names (the first environment's when it names none of
    them)."""
    profile = ctx.loaded.profile
    if not profile.jupyter.enabled:
        return []
    group = "notebooks"
    listed = ctx.target.run(f"{JUPYTER_BIN}/jupyter kernelspec list --json")
    try:
        specs = json.loads(listed.stdout)["kernelspecs"]
    except (json.JSONDecodeError, KeyError):
        specs = {}
    environments = [env.name for env in profile.environments]
    problems = kernel_problems(specs, environments)
    results = [
        result(
            "jupyter: each environment is a kernel",
            not problems,
            f"kernels {sorted(specs)}; environments {sorted(environments)}"
            + (f": {'; '.join(problems)}" if problems else ", each on its own python"),
            group,
        )
    ]
    for notebook in profile.notebooks:
        name = notebook.rsplit("/", 1)[-1]
        kernel = notebook_kernel(Path(notebook), environments)
        run = ctx.target.run(
            "sudo -u jupyter -H sh -c "
            + quote(
                f'work=$(mktemp -d) && cd "$work" && cp {SAMPLES_DIR}/{quote(name)} . && '
                f"{JUPYTER_BIN}/python -c {quote(NOTEBOOK_RUNNER)} "
                f'{quote(name)} {quote(kernel)}; status=$?; rm -rf "$work"; exit $status'
            ),
            timeout=1800,
        )
        error = (run.stderr.strip().splitlines() or ["no output"])[-1]
        results.append(
            result(
                f"notebooks: {name} runs headless",
                run.ok,
                f"kernel {kernel}: {run.stdout.strip() or error[:300]}",
                group,
            )
        )
    return results
