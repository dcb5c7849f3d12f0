"""The one-node Slurm cluster the tests can submit to (tests/slurm_cluster.py): a job array
runs, a task that exits 6 requeues itself once from inside as `factory plan --format slurm`'s
script does (factory/plan.py), the exit codes can be read, and no daemon is left afterwards."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from tests.slurm_cluster import slurm_cluster

# Tasks 0 and 1 pass; task 2 exits 6 ("this node lacks something") and, like the plan's
# script, requeues itself while SLURM_RESTART_COUNT is below the limit (here one retry).
ARRAY_SCRIPT = """\
#!/bin/bash
#SBATCH --job-name=factory-slurm-check
#SBATCH --array=0-2
#SBATCH --cpus-per-task=1
#SBATCH --mem=64M
#SBATCH --requeue
#SBATCH --output=task-%A_%a.out
set -u
task="${SLURM_ARRAY_TASK_ID:?submit this script with sbatch}"
echo "$task ${SLURM_RESTART_COUNT:-0}" >> "runs-$task"
status=0
if [ "$task" -eq 2 ]; then
  status=6
fi
case "$status" in 6)
  if [ "${SLURM_RESTART_COUNT:-0}" -lt 1 ]; then
    echo "exit $status: this node lacks something the job needs; requeued" >&2
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_$task"
  fi
  ;;
esac
exit "$status"
"""


def test_one_node_cluster_runs_an_array_requeues_and_leaves_nothing(tmp_path: Path, request):
    work = tmp_path / "work"
    work.mkdir()
    script = work / "array.sh"
    script.write_text(ARRAY_SCRIPT)
    started = time.monotonic()

    # Its sockets' paths must stay short (108 bytes): not under a worker's tmp_path.
    short = Path(tempfile.mkdtemp(prefix="slurm-"))
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    with slurm_cluster(short) as cluster:
        daemons = {name: process.pid for name, process in cluster.daemons.items()}
        assert set(daemons) == {"munged", "slurmctld", "slurmd"}

        job = cluster.sbatch(script, cwd=work)
        tasks = cluster.wait(job, timeout=45)

        # A node that can never run the job refuses it at submission, not by pending forever.
        gpu = cluster.run("sbatch", "--gres=gpu:1", "--wrap", "true", check=False, cwd=work)
        assert gpu.returncode == 1
        assert "Invalid generic resource (gres) specification" in gpu.stderr
        too_big = cluster.run(
            "sbatch", "--cpus-per-task=999", "--wrap", "true", check=False, cwd=work
        )
        assert too_big.returncode == 1
        assert "More processors requested than permitted" in too_big.stderr
        completions = cluster.completions()

    assert [(t["ArrayTaskId"], t["JobState"], t["ExitCode"], t["Restarts"]) for t in tasks] == [
        ("0", "COMPLETED", "0:0", "0"),
        ("1", "COMPLETED", "0:0", "0"),
        ("2", "FAILED", "6:0", "1"),
    ], f"{tasks}\n{cluster.logs()}"
    # Each try wrote its task id and restart count; the requeued task ran twice.
    assert (work / "runs-0").read_text() == "0 0\n"
    assert (work / "runs-1").read_text() == "1 0\n"
    assert (work / "runs-2").read_text() == "2 0\n2 1\n"
    assert (work / f"task-{job}_0.out").exists()
    # The completion log keeps every run's end: the requeued one, then the retry's exit 6.
    task2 = [(c["JobState"], c["ExitCode"]) for c in completions if c["ArrayTaskId"] == "2"]
    assert task2 == [("PENDING", "0:0"), ("FAILED", "6:0")], completions

    # Nothing is left: no daemon, no slurmstepd, no job process.
    assert cluster.processes() == []
    for name, pid in daemons.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} ({pid}) still running"
    assert time.monotonic() - started < 60
