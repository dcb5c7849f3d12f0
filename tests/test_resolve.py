"""Locking against the real local channel with rattler, and pip's resolver for the target."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from factory.errors import FactoryError
from factory.profile import load_profile
from factory.resolve import ConflictError, lock_dir_for, lock_profile, solve_pip, stale_locks
from tests.conftest import DEMO_PROFILE, run_factory

KEY = DEMO_PROFILE.read_text().split("- ssh-ed25519 ", 1)[1].split("\n", 1)[0]


def profile_with(
    tmp_path: Path, channel: Path, conda: str, pip: str = "[]", python: str = "3.11"
) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"""\
client: acme
project: locks
version: 1
admin: {{user: analyst, ssh_keys: ["ssh-ed25519 {KEY}"]}}
jupyter: {{enabled: false}}
environments:
  - name: model
    python: "{python}"
    channels: ["{channel.as_uri()}"]
    conda: {conda}
    pip: {pip}
""")
    return path


def test_lock_writes_explicit_and_pip_locks(tmp_path, test_channel):
    loaded = load_profile(profile_with(tmp_path, test_channel, "[six]", "[tabulate]"))
    locks = lock_profile(loaded, log=lambda _: None)
    lock = locks["model"]
    assert {p.name for p in lock.conda} >= {"python", "six", "pip"}
    assert [p.name for p in lock.pip] == ["tabulate"]
    folder = lock_dir_for(loaded)
    explicit = (folder / "model.explicit.txt").read_text()
    assert "@EXPLICIT" in explicit and "/python-3.11.2-" in explicit
    assert "--hash=sha256:" in (folder / "model.pip.txt").read_text()


def test_locked_refuses_a_stale_lock_and_stale_locks_names_it(tmp_path, test_channel):
    path = profile_with(tmp_path, test_channel, "[six]")
    loaded = load_profile(path)
    assert stale_locks(loaded) == ["model"]  # no lock yet
    with pytest.raises(FactoryError, match=r"the lock of 'model' is missing or no longer"):
        lock_profile(loaded, log=lambda _: None, locked=True)
    assert not lock_dir_for(loaded).exists()
    lock_profile(loaded, log=lambda _: None)
    assert stale_locks(loaded) == []
    assert lock_profile(loaded, log=lambda _: None, locked=True)["model"].name == "model"
    path.write_text(path.read_text().replace("conda: [six]", "conda: [six, tabulate]"))
    changed = load_profile(path)
    assert stale_locks(changed) == ["model"]
    with pytest.raises(FactoryError, match=r"run `factory lock "):
        lock_profile(changed, log=lambda _: None, locked=True)


def test_second_lock_is_identical_and_does_not_solve(tmp_path, test_channel):
    loaded = load_profile(profile_with(tmp_path, test_channel, "[six]"))
    lock_profile(loaded, log=lambda _: None)
    folder = lock_dir_for(loaded)
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    time.sleep(0.01)
    lock_profile(loaded, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    lock_profile(loaded, force=True, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first


@pytest.mark.parametrize(
    "conda,python,expected",
    [
        ("[wants-pinned-lib-1, wants-pinned-lib-2]", "3.11", "pinned-lib"),
        ("[needs-newer-python]", "3.11", "needs-newer-python"),
        ("[no-such-package]", "3.11", "no-such-package"),
    ],
)
def test_conflicts_stop_in_seconds_and_name_packages(
    tmp_path, test_channel, conda, python, expected
):
    path = profile_with(tmp_path, test_channel, conda, python=python)
    started = time.monotonic()
    result = run_factory("lock", str(path))
    assert time.monotonic() - started < 10
    assert result.returncode == 3  # conflict
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    first_line = errors[0]
    assert first_line.startswith("error: environment 'model'")
    assert expected in first_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p.lock" / "model.explicit.txt").exists()


def test_pip_package_without_wheel_for_target_python():
    # numpy 1.21.0 shipped no wheels for python 3.11.
    with pytest.raises(ConflictError) as error:
        solve_pip("model", "3.11", ["numpy==1.21.0"])
    assert "numpy==1.21.0" in str(error.value)
    assert "python 3.11" in str(error.value)


def test_lock_json_round_trips(tmp_path, test_channel):
    loaded = load_profile(profile_with(tmp_path, test_channel, "[six]"))
    lock = lock_profile(loaded, log=lambda _: None)["model"]
    data = json.loads((lock_dir_for(loaded) / "model.lock.json").read_text())
    assert data["inputs"] == lock.inputs_hash


def test_bundle_is_an_indexed_channel_and_wheelhouse_with_checksums(tmp_path, test_channel):
    """`factory bundle`: every locked conda package in an indexed channel, every locked
    wheel in the wheelhouse, and SHA256SUMS that sha256sum accepts."""
    profile = profile_with(tmp_path, test_channel, "[six]", "[tabulate]")
    outputs = tmp_path / "outputs"
    result = run_factory("bundle", str(profile), "--outputs", str(outputs))
    assert result.returncode == 0, result.stderr
    bundle = outputs / "bundles" / "acme_locks_v1"
    lock = json.loads((lock_dir_for(load_profile(profile)) / "model.lock.json").read_text())
    indexed = {}
    for subdir in ("linux-64", "noarch"):
        repodata = json.loads((bundle / "channel" / subdir / "repodata.json").read_text())
        indexed |= repodata.get("packages", {}) | repodata.get("packages.conda", {})
    assert {p["file_name"] for p in lock["conda"]} <= set(indexed)
    wheels = {w.name.split("-")[0].lower() for w in (bundle / "wheels").glob("*.whl")}
    assert {p["name"] for p in lock["pip"]} <= wheels
    check = subprocess.run(
        ["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=bundle, capture_output=True
    )
    assert check.returncode == 0, check.stdout
    assert [p.name for p in (outputs / "bundles").iterdir()] == ["acme_locks_v1"]


def test_first_environment_defaults_to_the_delivery_name(tmp_path, test_channel):
    path = profile_with(tmp_path, test_channel, "[six]")
    path.write_text(path.read_text().replace("  - name: model\n    python", "  - python"))
    loaded = load_profile(path)
    assert loaded.profile.environments[0].name == "acme_locks_v1"


def test_virtual_packages_come_from_the_base_and_the_profile(tmp_path, test_channel):
    """__glibc follows the base OS; a profile's __cuda reaches the solver and the lock's
    inputs, so changing it solves again."""
    path = profile_with(tmp_path, test_channel, "[six]")
    loaded = load_profile(path)
    assert loaded.profile.target_virtual_packages()["__glibc"] == "2.36"
    first = lock_profile(loaded, log=lambda _: None)["model"].inputs_hash
    path.write_text(path.read_text() + 'virtual_packages: {__cuda: "12.2"}\n')
    loaded = load_profile(path)
    assert loaded.profile.target_virtual_packages()["__cuda"] == "12.2"
    assert lock_profile(loaded, log=lambda _: None)["model"].inputs_hash != first


def test_environment_yml_is_imported_and_locked(tmp_path, test_channel):
    """An exported environment.yml (conda deps plus a pip list) becomes a profile environment
    and solves against its own channels; the profile's keys win."""
    (tmp_path / "environment.yml").write_text(f"""\
name: scoring
channels: ["{test_channel}"]
dependencies:
  - python=3.11
  - six
  - pip
  - pip:
      - tabulate
""")
    path = profile_with(tmp_path, test_channel, "[]")
    text = path.read_text().split("environments:")[0]
    path.write_text(text + "environments:\n  - environment_file: environment.yml\n")
    loaded = load_profile(path)
    env = loaded.profile.environments[0]
    assert (env.name, env.python, env.pip) == ("scoring", "3.11", ["tabulate"])
    lock = lock_profile(loaded, log=lambda _: None)["scoring"]
    assert {"python", "six", "pip"} <= {p.name for p in lock.conda}
    assert [p.name for p in lock.pip] == ["tabulate"]
    path.write_text(path.read_text() + "    name: renamed\n")
    assert load_profile(path).profile.environments[0].name == "renamed"


def test_lock_refuses_a_framework_built_for_another_cuda(tmp_path, test_channel):
    """pip's resolver picks PyPI's torch 2.5.1, a CUDA 12.4 build: a profile that targets
    CUDA 12.1 is refused at lock time, before any VM boots; torch 2.3.1 (CUDA 12.1) locks."""
    path = profile_with(tmp_path, test_channel, "[]", "[torch==2.5.1]")
    path.write_text(path.read_text() + 'gpu: {cuda: "12.1", frameworks: {pytorch: "2.5"}}\n')
    result = run_factory("lock", str(path))
    assert result.returncode == 3  # a conflict: change the packages or gpu.cuda
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "the locked torch 2.5.1 is built for CUDA 12.4, but gpu.cuda is 12.1" in errors[0]
    path.write_text(
        path.read_text().replace("torch==2.5.1", "torch==2.3.1").replace('"2.5"', '"2.3"')
    )
    result = run_factory("lock", str(path))
    assert result.returncode == 0, result.stderr


def test_environment_yml_with_channel_specs_is_locked_from_that_channel(tmp_path, test_channel):
    """conda's reading of an environment.yml: 'conda-forge::six' is taken from the channel
    named conda-forge (here a local mirror folder of that name), alongside a pip section; the
    lock solves for real and every package comes from that folder."""
    mirror = tmp_path / "conda-forge"
    mirror.mkdir()
    for subdir in ("noarch", "linux-64"):
        (mirror / subdir).symlink_to(test_channel / subdir)
    (tmp_path / "environment.yml").write_text("""\
name: scoring
channels:
  - ./conda-forge
dependencies:
  - conda-forge::python=3.11
  - conda-forge::six>=1.16
  - pip
  - pip:
      - tabulate==0.10.0
""")
    path = profile_with(tmp_path, test_channel, "[]")
    text = path.read_text().split("environments:")[0]
    path.write_text(text + "environments:\n  - environment_file: environment.yml\n")
    loaded = load_profile(path)
    env = loaded.profile.environments[0]
    assert env.python == "3.11"
    assert env.conda == ["conda-forge::python=3.11", "conda-forge::six>=1.16", "pip"]
    lock = lock_profile(loaded, log=lambda _: None)["scoring"]
    six = next(p for p in lock.conda if p.name == "six")
    assert six.version == "1.17.0"
    assert six.url.startswith(mirror.as_uri() + "/noarch/")
    assert {p.url.rsplit("/", 2)[0] for p in lock.conda} == {mirror.as_uri()}
    assert [(p.name, p.version) for p in lock.pip] == [("tabulate", "0.10.0")]


def test_a_spec_channel_that_holds_no_match_is_a_conflict(tmp_path, test_channel):
    """'channel::name' really restricts the solve: the test channel's six is not taken for
    a spec that names another channel of the environment."""
    other = tmp_path / "other"
    (other / "noarch").mkdir(parents=True)
    (other / "noarch" / "repodata.json").write_text('{"info": {"subdir": "noarch"}}')
    path = profile_with(tmp_path, test_channel, '["other::six"]')
    path.write_text(path.read_text().replace("channels: [", 'channels: ["./other", '))
    result = run_factory("lock", str(path))
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0] == (
        "error: environment 'model': six is not in the channel that other::six names; add it "
        "to that channel or name another one"
    )


def test_lock_time_pip_ignores_the_hosts_pip_configuration(tmp_path, monkeypatch):
    """solve_pip runs pip --isolated against PyPI: a host PIP_* setting that would send it
    elsewhere (here: no index at all, an empty find-links) does not reach it."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    packages = solve_pip("model", "3.11", ["tabulate==0.10.0"])
    assert [(p.name, p.version) for p in packages] == [("tabulate", "0.10.0")]
    assert packages[0].url.startswith("https://files.pythonhosted.org/")
