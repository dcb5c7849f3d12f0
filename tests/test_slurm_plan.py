"""A plan run by a real scheduler: `factory plan --format slurm` for two profiles, submitted to
a one-node Slurm cluster (tests/slurm_cluster.py). Both jobs build and validate through one
shared layer cache, validating the groups the plan names (`--only env,lock`); submitted again,
both skip as cache hits (`factory verify --profile --only`, tested on its own in
test_provenance.py and test_verify_scope.py).

It shares the demo's layers through the cache, not the demo_delivery fixture, so it may run in
either worker: one that needs a layer the other is making waits for it (layers.py's lock)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from tests.conftest import FACTORY, demo_variant
from tests.slurm_cluster import slurm_cluster
from tests.test_layered_build import layer_lines

# The environments and their locks: what the shared layer changes. The demo's own validation
# runs every group (test_e2e.py); here the plan's jobs validate these.
VALIDATED = "env,lock"


def test_slurm_runs_the_plan_through_one_cache_and_a_rerun_skips_both(
    demo_channel, tmp_path, request
):
    """Two profiles share a new environment, unique to this run: the demo and its version 2.
    Slurm runs the plan's array, each task in its own process and its own TMPDIR, against the
    suite's one layer cache. The first task builds the new environment's layer, the second
    finds it; both validate and are handed on. The same script submitted again skips both."""
    work = tmp_path / "work"
    shared = f"shared{uuid.uuid4().hex[:8]}"

    def add_shared_env(profile: dict) -> None:
        # The demo's own validation breaks and rolls back an environment; here it only costs.
        profile.pop("snapshots", None)
        channel = profile["environments"][0]["channels"]
        env = {"name": shared, "python": "3.11", "channels": channel, "conda": ["python=3.11"]}
        profile["environments"].append(env)

    def version_2(profile: dict) -> None:
        add_shared_env(profile)
        profile["version"] = 2

    demo_variant(work, add_shared_env, "demo.yaml")
    demo_variant(work, version_2, "demo-v2.yaml")
    planned = subprocess.run(
        [*FACTORY, "plan", "demo.yaml", "demo-v2.yaml", "--format", "slurm",
         "--outputs", "out", "--output", "plan.sh", "--only", VALIDATED],
        cwd=work, capture_output=True, text=True,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stdout + planned.stderr

    # Its sockets' paths must stay short (108 bytes): not under a worker's tmp_path.
    short = Path(tempfile.mkdtemp(prefix="slurm-"))
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    with slurm_cluster(short) as cluster:
        cluster.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}"
        started = time.monotonic()
        first = cluster.sbatch(work / "plan.sh", cwd=work)
        cluster.wait(first, timeout=3600)
        first_wall = time.monotonic() - started
        started = time.monotonic()
        rerun = cluster.sbatch(work / "plan.sh", cwd=work)
        cluster.wait(rerun, timeout=300)
        rerun_wall = time.monotonic() - started
        ends = cluster.completions()
        logs = cluster.logs()

    runs = {(end["ArrayJobId"], end["ArrayTaskId"]): end for end in ends}  # each task's last
    outputs = {task: (work / f"factory-{first}_{task}.out").read_text() for task in ("0", "1")}
    for task in ("0", "1"):
        end = runs.get((first, task), {})
        assert (end.get("JobState"), end.get("ExitCode")) == ("COMPLETED", "0:0"), (
            f"{ends}\n{outputs[task][-3000:]}\n{logs}"
        )
    for name in ("demo_hello_v1", "demo_hello_v2"):
        delivery = work / "out" / name
        assert (delivery / f"{name}.ova").is_file()
        report = json.loads((delivery / "report.json").read_text())
        assert report["summary"]["failed"] == 0 and report["subject"]["only"] == ["env", "lock"]
    assert not list((work / "out").glob(".attempt-*")), "an attempt folder was left"

    # One cache for both: the new environment's layer was built once, by one task.
    verdicts = [layer_lines(outputs[task]) for task in ("0", "1")]
    layer = f"env {shared}"
    assert sorted(v[layer].split()[0] for v in verdicts) == ["hit", "miss"], verdicts
    for found in verdicts:
        assert found["system"] == found["env demo"] == "hit", found

    # The rerun: both deliveries are current and validated, so nothing is built.
    for task in ("0", "1"):
        text = (work / f"factory-{rerun}_{task}.out").read_text()
        assert "cache hit" in text and "skipped" in text, text[-2000:]
        assert "layer " not in text, text[-2000:]
    tasks_s = [_seconds(runs[(first, task)]) for task in ("0", "1")]
    print(
        f"slurm: two profiles built and validated in {first_wall:.0f} s (the tasks "
        f"{' + '.join(f'{s:.0f}' for s in tasks_s)} s); the rerun {rerun_wall:.0f} s"
    )
    assert rerun_wall < first_wall / 5


def _seconds(end: dict[str, str]) -> float:
    started, ended = (datetime.fromisoformat(end[k]) for k in ("StartTime", "EndTime"))
    return (ended - started).total_seconds()
