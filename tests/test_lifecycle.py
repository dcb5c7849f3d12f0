"""`factory new` (a starting profile from an industry preset) and `factory release` (the next
version of a profile, locked and staged in git, never one already delivered)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from factory.cli_lifecycle import new
from factory.errors import FactoryError
from factory.profile import load_profile
from factory.release import bump_version_text
from factory.starter import INDUSTRIES, PLACEHOLDER_KEY
from tests.conftest import run_factory
from tests.test_resolve import profile_with


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("industry", INDUSTRIES)
def test_new_writes_a_profile_that_loads_with_its_placeholders_marked(tmp_path, industry):
    result = run_factory(
        "new", "acme", "churn-model", "--industry", industry, "--into", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    path = tmp_path / "acme_churn_model_v1.yaml"
    loaded = load_profile(path)
    assert loaded.name == "acme_churn_model_v1"
    assert loaded.profile.industry == industry
    assert loaded.profile.admin.ssh_keys == [PLACEHOLDER_KEY]
    text = path.read_text()
    assert f"\nextends: {industry}\n" in text
    assert "REPLACE-ME" in text and "# TODO" in text
    assert f"factory lock {path}" in result.stdout and "REPLACE-ME" in result.stdout


def test_new_never_overwrites_and_refuses_bad_names_in_one_line(tmp_path):
    args = ("new", "acme", "churn", "--industry", "banking", "--into", str(tmp_path))
    run_factory(*args, check=True)
    path = tmp_path / "acme_churn_v1.yaml"
    path.write_text(path.read_text() + "# edited\n")
    again = run_factory(*args)
    assert again.returncode == 1
    assert f"{path} exists" in _one_error_line(again)
    assert path.read_text().endswith("# edited\n")
    bad = run_factory("new", "Acme", "churn", "--industry", "banking", "--into", str(tmp_path))
    assert bad.returncode == 1 and "CLIENT: 'Acme'" in _one_error_line(bad)
    unknown = run_factory("new", "acme", "x", "--industry", "retail", "--into", str(tmp_path))
    assert unknown.returncode == 2 and "retail" in _one_error_line(unknown)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme_churn_v1.yaml"]


def test_the_industry_choices_are_the_starters():
    industry = next(p for p in new.params if p.name == "industry")
    assert tuple(industry.type.choices) == INDUSTRIES


def test_bump_version_text_edits_only_the_version_line():
    text = "# v1\r\nclient: acme\r\nversion: 1   # bump on release\r\nx:\r\n  version: 1\r\n"
    assert bump_version_text(text, 1) == text.replace("version: 1   #", "version: 2   #")
    assert bump_version_text("version: 9\n", 9) == "version: 10\n"
    for unusable in ("client: a\n", "version: 1\nversion: 1\n", "version: 12\n"):
        with pytest.raises(FactoryError, match="no line `version: 1` of its own"):
            bump_version_text(unusable, 1)


def _git_repo(folder: Path) -> None:
    subprocess.run(["git", "init", "-q", str(folder)], check=True)


def _staged(folder: Path) -> list[str]:
    names = subprocess.run(
        ["git", "-C", str(folder), "diff", "--cached", "--name-only"],
        capture_output=True,
        text=True,
        check=True,
    )
    return names.stdout.split()


def test_release_bumps_the_version_locks_it_and_stages_both(tmp_path, test_channel):
    _git_repo(tmp_path)
    profile = profile_with(tmp_path, test_channel, "[six]")
    profile.write_text(profile.read_text().replace("version: 1", "version: 1  # shipped"))
    before = profile.read_text()
    outputs = tmp_path / "outputs"
    (outputs / "acme_locks_v1").mkdir(parents=True)
    (outputs / "acme_locks_v1" / "profile.yaml").write_text("delivered\n")

    result = run_factory("release", str(profile), "--outputs", str(outputs))
    assert result.returncode == 0, result.stderr
    assert profile.read_text() == before.replace("version: 1  #", "version: 2  #")
    assert load_profile(profile).name == "acme_locks_v2"
    assert "acme_locks_v1 -> acme_locks_v2" in result.stdout
    assert run_factory("lock", str(profile), "--check").returncode == 0
    assert _staged(tmp_path) == [
        "p.lock/model.explicit.txt",
        "p.lock/model.lock.json",
        "p.lock/model.pip.txt",
        "p.yaml",
    ]


def test_release_stages_no_lock_that_git_ignores(tmp_path, test_channel):
    _git_repo(tmp_path)
    (tmp_path / ".gitignore").write_text("/*.lock/\n")
    profile = profile_with(tmp_path, test_channel, "[six]")
    result = run_factory("release", str(profile), "--outputs", str(tmp_path / "outputs"))
    assert result.returncode == 0, result.stderr
    assert _staged(tmp_path) == ["p.yaml"]
    assert f"not staged, git ignores: {tmp_path / 'p.lock'}" in result.stdout


@pytest.mark.parametrize("delivered", [2, 3])
def test_release_never_makes_a_version_that_is_delivered(tmp_path, test_channel, delivered):
    profile = profile_with(tmp_path, test_channel, "[six]")
    before = profile.read_text()
    outputs = tmp_path / "outputs"
    (outputs / f"acme_locks_v{delivered}").mkdir(parents=True)
    (outputs / f"acme_locks_v{delivered}" / "profile.yaml").write_text("delivered\n")
    result = run_factory("release", str(profile), "--outputs", str(outputs))
    assert result.returncode == 1
    line = _one_error_line(result)
    assert f"version {delivered} is delivered already" in line
    assert f"set `version: {delivered}` in p.yaml" in line
    assert profile.read_text() == before
    assert not (tmp_path / "p.lock").exists()


def test_release_leaves_the_profile_as_it_was_when_it_cannot_be_released(tmp_path, test_channel):
    profile = profile_with(tmp_path, test_channel, "[no-such-package]")
    before = profile.read_text()
    unsolvable = run_factory("release", str(profile), "--outputs", str(tmp_path / "outputs"))
    assert unsolvable.returncode == 3  # the solver's story follows its one error line, as in lock
    errors = [line for line in unsolvable.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no-such-package" in errors[0]
    assert profile.read_text() == before

    child = tmp_path / "child.yaml"
    child.write_text("extends: p.yaml\nproject: other\n")  # its version comes from p.yaml
    inherited = run_factory("release", str(child), "--outputs", str(tmp_path / "outputs"))
    assert inherited.returncode == 1
    assert "no line `version: 1` of its own" in _one_error_line(inherited)
    assert child.read_text() == "extends: p.yaml\nproject: other\n"
