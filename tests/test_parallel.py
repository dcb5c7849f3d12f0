"""`factory build A B C --jobs N`: one real child process per profile, each with its own log,
a summary of all of them, and every child stopped on Ctrl-C or SIGTERM.

The profiles here fail in their profile check, within a second: no VM and no packer start."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.parallel import Batch, Job, format_summary
from tests.conftest import DEMO_PROFILE, REPO, run_factory, wait_until

# Runs a Batch of sleeping children as `factory build` runs its builds; each child writes its
# pid to <folder>/<name>.pid. Prints the summary however it ends.
PARENT = """
import sys
from pathlib import Path
from factory.parallel import Batch, Job, format_summary
from factory.processes import signals_as_exceptions
folder = Path(sys.argv[1])
sleeper = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
jobs = [
    Job(name, (sys.executable, "-c", sleeper, str(folder / f"{name}.pid")), folder / f"{name}.log")
    for name in ("one", "two", "three")
]
batch = Batch(jobs, limit=2)
try:
    with signals_as_exceptions():
        batch.run()
finally:
    print(format_summary(batch.outcomes()), flush=True)
"""


def broken_profiles(folder: Path) -> dict[str, tuple[Path, str]]:
    """Copies of the demo profile, each failing its profile check: name -> (file, error)."""
    demo = DEMO_PROFILE.read_text()
    notebooks = folder / "notebooks"
    notebooks.mkdir()
    for notebook in (DEMO_PROFILE.parent / "notebooks").glob("*.ipynb"):
        (notebooks / notebook.name).write_bytes(notebook.read_bytes())
    shutil.copytree(DEMO_PROFILE.parent / "services", folder / "services")
    cases = {
        "cpus": (demo.replace("cpus: 2", "cpus: lots"), "resources.cpus"),
        "notebook": (
            demo.replace("notebooks/demo-credit-score.ipynb", "notebooks/missing.ipynb"),
            "no file",
        ),
        "version": (demo.replace("version: 1", "version: [1]"), "version"),
    }
    profiles = {}
    for name, (text, error) in cases.items():
        assert text != demo, f"the {name} case no longer changes the demo profile"
        (folder / f"{name}.yaml").write_text(text)
        profiles[name] = (folder / f"{name}.yaml", error)
    return profiles


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_several_profiles_each_get_a_log_and_a_line_in_the_summary(tmp_path: Path):
    profiles = broken_profiles(tmp_path)
    outputs = tmp_path / "outputs"
    cache = tmp_path / "cache"
    paths = [str(path) for path, _ in profiles.values()]
    started = time.monotonic()
    result = run_factory(
        "--cache-dir", str(cache), "build", *paths, "--jobs", "2", "--outputs", str(outputs),
        "--accelerator", "tcg", timeout=120,
    )  # fmt: skip
    assert time.monotonic() - started < 60, "the profile checks should fail at once"
    assert result.returncode == 2, result.stderr  # each a bad profile: the batch says so too
    assert result.stderr.splitlines()[-1].startswith("error: 3 of 3 builds failed; ")
    summary = result.stdout.splitlines()
    assert summary[0].split() == ["PROFILE", "DELIVERY", "RESULT", "SECONDS", "LOG", "ERROR"]
    assert len(summary) == 1 + len(profiles)
    for row, (name, (path, error)) in zip(summary[1:], profiles.items(), strict=True):
        log = outputs / "logs" / f"{name}.build.log"
        assert row.split()[:3] == [str(path), "-", "FAILED"]
        assert str(log) in row
        text = log.read_text()
        # The child ran the same build, with the same options, and its error is in the row.
        assert text.startswith(f"$ {sys.executable} -m factory --cache-dir {cache} build {path}")
        assert "--outputs" in text.splitlines()[0] and "--accelerator tcg" in text.splitlines()[0]
        error_line = next(line for line in text.splitlines() if line.startswith("error: "))
        assert error in error_line
        assert row.endswith(error_line[:300])
    # At most two at once: the third starts only after one of the first two ended.
    progress = result.stderr.splitlines()
    third = next(i for i, line in enumerate(progress) if line.startswith("[3/3]"))
    first_end = next(i for i, line in enumerate(progress) if ": FAILED in " in line)
    assert first_end < third
    assert sum(": started; log " in line for line in progress) == 3
    assert not (outputs / "demo_hello_v1").exists()


def test_events_name_each_build_and_the_batch_in_json_lines(tmp_path: Path):
    """With --events json the children's events reach standard output as whole JSON lines,
    each build's end with its exit code, then the batch's; the table goes to standard error.
    One bad profile and one whose build machine cannot fit this host end with 2 and 6."""
    profiles = broken_profiles(tmp_path)
    too_big = tmp_path / "big.yaml"
    too_big.write_text(
        DEMO_PROFILE.read_text().replace("disk: 8\n", "disk: 8\n  build_memory: 1048576\n")
    )
    paths = [str(profiles["cpus"][0]), str(too_big)]
    result = run_factory(
        "build", *paths, "--jobs", "2", "--outputs", str(tmp_path / "out"), "--events", "json",
        timeout=120,
    )  # fmt: skip
    events = [json.loads(line) for line in result.stdout.splitlines()]  # nothing else there
    ends = {Path(e["profile"]).name: e for e in events if e["event"] == "build-end"}
    assert ends["cpus.yaml"]["exit_code"] == 2 and "resources.cpus" in ends["cpus.yaml"]["error"]
    big = next(e for e in events if e["event"] == "build-end" and e is not ends["cpus.yaml"])
    assert big["exit_code"] == 6 and "build_memory" in big["error"], events
    assert big["status"] == "failed" and big["profile"] == "demo_hello_v1"
    batch = events[-1]
    assert batch["event"] == "batch-end" and batch["exit_code"] == 1  # two different codes
    assert [r["exit_code"] for r in batch["results"]] == [2, 6]
    assert result.returncode == 1
    assert "PROFILE" in result.stderr and "RESULT" in result.stderr


def test_jobs_must_be_at_least_one(tmp_path: Path):
    profiles = [str(path) for path, _ in broken_profiles(tmp_path).values()]
    outputs = tmp_path / "outputs"
    result = run_factory("build", *profiles, "--jobs", "0", "--outputs", str(outputs), timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: Invalid value for '--jobs': 0 is not in the range x>=1."
    ]
    assert not outputs.exists()


def test_two_profiles_with_one_file_name_are_refused_before_any_build(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "demo.yaml", tmp_path / "b" / "demo.yaml"
    for path in (first, second):
        path.write_text(DEMO_PROFILE.read_text())
    result = run_factory("build", str(first), str(second), "--outputs", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: PROFILES: {first} and {second} would share the log "
        f"{tmp_path / 'out' / 'logs' / 'demo.build.log'}; give each profile its own file name"
    ]
    assert not (tmp_path / "out" / "logs").exists()


def test_a_batch_reports_passes_failures_and_the_delivery_each_built(tmp_path: Path):
    """Real children standing in for builds: one ends as a build does, two fail."""
    passes = "print('[00:01] export'); print('built demo_hello_v1 in 3 s: /outputs/demo_hello_v1')"
    fails = "import sys; sys.exit('error: the disk is full; free some space')"
    silent = "exit(3)"
    jobs = [
        Job(name, (sys.executable, "-c", code), tmp_path / "logs" / f"{name}.log")
        for name, code in (("passes", passes), ("fails", fails), ("silent", silent))
    ]
    lines: list[str] = []
    outcomes = Batch(jobs, limit=3, log=lines.append).run()
    assert [(o.result, o.delivery, o.error) for o in outcomes] == [
        ("passed", "demo_hello_v1", ""),
        ("FAILED", None, "error: the disk is full; free some space"),
        ("FAILED", None, "exit 3, no error line in the log"),
    ]
    rows = format_summary(outcomes).splitlines()[1:]
    assert rows[0].split()[:3] == ["passes", "demo_hello_v1", "passed"]
    assert rows[1].endswith("error: the disk is full; free some space")
    assert sum("started" in line for line in lines) == 3
    assert (tmp_path / "logs" / "fails.log").read_text().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, -2)])
def test_a_stop_signal_stops_every_running_build(tmp_path: Path, signum: int, exit_code: int):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_files = [tmp_path / "one.pid", tmp_path / "two.pid"]
    try:
        assert wait_until(lambda: all(p.is_file() and p.read_text() for p in pid_files))
        pids = [int(p.read_text()) for p in pid_files]
        assert all(alive(pid) for pid in pids)
        assert not (tmp_path / "three.pid").exists()  # at most two at once
        parent.send_signal(signum)
        out, err = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == exit_code, err
    assert not any(alive(pid) for pid in pids)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["one", "-"], ["two", "-"], ["three", "-"]]
    assert [row[2] for row in rows[:2]] == ["stopped", "stopped"]
    assert rows[2][2:4] == ["not", "started"]
    assert not (tmp_path / "three.pid").exists()
