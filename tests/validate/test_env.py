"""env and lock: every environment exists, imports its packages and matches its lock; the
lock check hands back what it read."""

import json

from factory.validate.env import check_environment, check_matches_lock
from factory.validate.run import _write_exports
from tests.validate.conftest import command_with, failed, statuses

DEMO_PROBE = "/opt/conda/envs/demo/bin/python -c '\nimport importlib, importlib.metadata"
DEMO_EXPORT = "/opt/conda/envs/demo/bin/python -c '\nimport importlib.metadata as md"


def demo(loaded):
    return next(env for env in loaded.profile.environments if env.name == "demo")


def test_the_recorded_demo_environment_passes(ctx, loaded):
    results = check_environment(ctx, demo(loaded))
    assert failed(results) == {}
    assert "demo: imports tabulate" in statuses(results)


def test_a_package_that_does_not_import_fails(ctx, target, loaded):
    command = command_with(target, DEMO_PROBE)
    data = json.loads(target.commands[command].stdout)
    data["pip"]["tabulate"] = {"version": "0.10.0", "error": "import failed: No module named 'x'"}
    target.answer(command, stdout=json.dumps(data) + "\n")
    assert failed(check_environment(ctx, demo(loaded))) == {
        "demo: imports tabulate": "import failed: No module named 'x'"
    }


def test_a_missing_environment_fails(ctx, target, loaded):
    command = command_with(target, DEMO_PROBE)
    target.answer(
        command,
        exit_code=127,
        stdout="",
        stderr="bash: line 1: /opt/conda/envs/demo/bin/python: No such file or directory\n",
    )
    (result,) = check_environment(ctx, demo(loaded))
    assert result.status == "failed" and "No such file" in result.detail


def test_every_lock_matches_and_the_export_travels_on_the_result(ctx, target):
    for lock in ctx.locks:
        (result,) = check_matches_lock(ctx, lock)
        assert result.status == "passed", result.detail
        assert result.data["environment"] == lock["name"]
        assert set(result.data["installed"]) == {"conda", "pip"}
    demo_export = json.loads(target.commands[command_with(target, DEMO_EXPORT)].stdout)
    (demo_result,) = check_matches_lock(ctx, next(k for k in ctx.locks if k["name"] == "demo"))
    assert demo_result.data["installed"] == demo_export


def test_a_package_at_another_version_than_locked_fails(ctx, target):
    command = command_with(target, DEMO_EXPORT)
    data = json.loads(target.commands[command].stdout)
    data["pip"]["tabulate"] = "0.9.0"
    target.answer(command, stdout=json.dumps(data) + "\n")
    (result,) = check_matches_lock(ctx, next(k for k in ctx.locks if k["name"] == "demo"))
    assert result.status == "failed" and "tabulate 0.9.0 (lock 0.10.0)" in result.detail


def test_the_run_saves_the_exports_the_lock_results_carry(ctx, tmp_path):
    results = [r for lock in ctx.locks for r in check_matches_lock(ctx, lock)]
    _write_exports(results, tmp_path)
    saved = json.loads((tmp_path / "envs" / "demo.installed.json").read_text())
    assert saved == next(r.data["installed"] for r in results if r.name.startswith("demo:"))
    freeze = (tmp_path / "envs" / "demo.pip-freeze.txt").read_text()
    assert "tabulate==0.10.0\n" in freeze
