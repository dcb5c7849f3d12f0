"""`factory diff`: what changed between two profiles or deliveries. The logic is tested on
values; the command on real locks made by `factory lock` and on delivery folders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from factory.delivery import Delivery, write_delivered_profile
from factory.diff import (
    Changes,
    Locked,
    PackageChange,
    SettingChange,
    Source,
    compare,
    compare_packages,
    compare_settings,
    diff_paths,
    effective_settings,
    pair_environments,
    render_markdown,
    render_text,
)
from factory.profile import load_profile
from factory.resolve import CondaPackage, EnvLock, PipPackage
from factory.sbom import DEB, Package, write_sbom
from tests.conftest import demo_variant, run_factory
from tests.test_resolve import profile_with


def _newer(old: str, new: str) -> bool:
    return tuple(map(int, old.split("."))) < tuple(map(int, new.split(".")))


def test_packages_added_removed_upgraded_downgraded_and_rebuilt():
    old = {
        "gone": Locked("1.0", "a"),
        "same": Locked("1.0", "b"),
        "up": Locked("1.9", "c"),
        "down": Locked("2.0", "d"),
        "rebuilt": Locked("1.0", "e"),
    }
    new = {
        "same": Locked("1.0", "b"),
        "up": Locked("1.10", "c2"),
        "down": Locked("1.0", "d2"),
        "rebuilt": Locked("1.0", "e2"),
        "added": Locked("0.1", "f"),
    }
    assert compare_packages(old, new, _newer) == [
        PackageChange("added", None, "0.1"),
        PackageChange("down", "2.0", "1.0", "downgrade"),
        PackageChange("gone", "1.0", None),
        PackageChange("rebuilt", "1.0", "1.0", "another build"),
        PackageChange("up", "1.9", "1.10", "upgrade"),
    ]


def test_a_version_its_ecosystem_cannot_order_is_shown_without_a_direction():
    changes = compare_packages({"x": Locked("weird")}, {"x": Locked("1.0")}, _newer)
    assert changes == [PackageChange("x", "weird", "1.0", "")]


def test_environments_pair_by_name_and_a_single_leftover_is_a_rename():
    assert pair_environments(["a", "jupyter"], ["jupyter", "a"]) == {"a": "a", "jupyter": "jupyter"}
    assert pair_environments(["old", "jupyter"], ["new", "jupyter"]) == {
        "jupyter": "jupyter",
        "old": "new",
    }
    assert pair_environments(["x", "y"], ["z", "w"]) == {}


def test_settings_are_dotted_paths_in_model_order_and_none_is_unset():
    old = {"a": 1, "gpu": None, "security": {"open_ports": [8080], "firewall": True}, "z": "k"}
    new = {"a": 1, "gpu": {"cuda": "12.1"}, "security": {"open_ports": [8080, 9090]}, "z": "k"}
    assert compare_settings(old, new) == [
        SettingChange("gpu.cuda", "(unset)", "12.1"),
        SettingChange("security.open_ports", "[8080]", "[8080, 9090]"),
        SettingChange("security.firewall", "true", "(unset)"),
    ]


# A channel no test reads: locks in these tests are made by hand.
NO_CHANNEL = Path("/nonexistent/channel")


def _profile(folder: Path, extra: str = "", pip: str = "[tabulate]", env: str = "model") -> Path:
    """A small profile in `folder`; `extra` is appended, `env` names its environment."""
    folder.mkdir(parents=True, exist_ok=True)
    path = profile_with(folder, NO_CHANNEL, "[six]", pip)
    path.write_text(path.read_text().replace("name: model", f"name: {env}") + extra)
    return path


def test_effective_settings_leave_specs_to_the_locks_and_add_the_open_ports(tmp_path):
    old = load_profile(_profile(tmp_path / "a"))
    new = load_profile(_profile(tmp_path / "b", "monitoring: {enabled: true}\n", pip="[idna]"))
    settings = effective_settings(new)
    assert "pip" not in settings["environments"]["model"]
    assert settings["environments"]["model"]["channels"] == [NO_CHANNEL.as_uri()]
    assert compare_settings(effective_settings(old), settings) == [
        SettingChange("monitoring.enabled", "false", "true"),
        SettingChange("open_ports", "[22]", "[22, 9100]"),
    ]


def _lock(name: str, conda: dict[str, str], pip: dict[str, str]) -> EnvLock:
    return EnvLock(
        name=name,
        python="3.11",
        inputs_hash="0",
        conda=[
            CondaPackage(n, v, f"u/{n}", f"{n}.conda", "md5", f"sha-{n}-{v}")
            for n, v in conda.items()
        ],
        pip=[PipPackage(n, v, f"u/{n}", f"sha-{n}-{v}") for n, v in pip.items()],
    )


def test_a_renamed_environment_is_compared_with_its_old_self(tmp_path):
    old = Source(
        "a",
        load_profile(_profile(tmp_path / "a")),
        {"model": _lock("model", {"six": "1.16.0"}, {"idna": "3.9"})},
    )
    new = Source(
        "b",
        load_profile(_profile(tmp_path / "b", env="risk")),
        {"risk": _lock("risk", {"six": "1.17.0"}, {"idna": "3.9"})},
    )
    assert render_text(compare(old, new)) == (
        "environment risk (was model), conda packages:\n"
        "  ~ six 1.16.0 -> 1.17.0 (upgrade)\n"
        "settings:\n"
        "  environments.risk.name: model -> risk\n"
    )


def test_text_and_markdown_say_the_same_things():
    changes = Changes(
        "a.yaml",
        "b.yaml",
        settings=[SettingChange("description", "x | y", "z")],
        debian=[PackageChange("openssl", "3.0.15-1~deb12u1", "3.0.16-1~deb12u1", "upgrade")],
    )
    assert render_text(changes) == (
        "settings:\n"
        "  description: x | y -> z\n"
        "debian packages (system-wide):\n"
        "  ~ openssl 3.0.15-1~deb12u1 -> 3.0.16-1~deb12u1 (upgrade)\n"
    )
    markdown = render_markdown(changes)
    assert "| `description` | x \\| y | z |" in markdown
    assert "| openssl | 3.0.15-1~deb12u1 | 3.0.16-1~deb12u1 | upgrade |" in markdown
    assert render_text(Changes("a", "b")) == "no differences between a and b\n"
    assert render_markdown(Changes("a", "b")).endswith("No differences.\n")


def _delivery(root: Path, profile: Path, lock: EnvLock, debian: dict[str, str] | None) -> Path:
    """A delivery folder as a build leaves it, for what diff reads: the effective profile,
    the locks and (when `debian` is given) the SBOM."""
    loaded = load_profile(profile)
    delivery = Delivery(root / loaded.name, loaded.name)
    (delivery.locks).mkdir(parents=True)
    write_delivered_profile(loaded, delivery)
    (delivery.locks / f"{lock.name}.lock.json").write_text(json.dumps(lock.to_json()))
    if debian is not None:
        packages = [Package(DEB, n, v, arch="amd64") for n, v in debian.items()]
        write_sbom(packages, loaded.name, "1", delivery.sbom)
    return delivery.path


def test_deliveries_compare_their_debian_packages_when_both_have_an_sbom(tmp_path):
    profile = _profile(tmp_path / "src")
    lock = _lock("model", {"six": "1.17.0"}, {"tabulate": "0.9.0"})
    old = _delivery(
        tmp_path / "old", profile, lock, {"openssl": "3.0.15-1~deb12u1", "vim": "2:9.0"}
    )
    new = _delivery(
        tmp_path / "new", profile, lock, {"openssl": "3.0.16-1~deb12u1", "curl": "7.88.1-10"}
    )
    assert render_text(diff_paths(old, new)) == (
        "debian packages (system-wide):\n"
        "  + curl 7.88.1-10\n"
        "  ~ openssl 3.0.15-1~deb12u1 -> 3.0.16-1~deb12u1 (upgrade)\n"
        "  - vim 2:9.0\n"
    )
    no_sbom = _delivery(tmp_path / "bare", profile, lock, None)
    assert diff_paths(old, no_sbom).empty  # skipped when one side has none


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    profile = _profile(tmp_path / "p")
    empty = tmp_path / "empty"
    empty.mkdir()
    for old, new, expected in (
        (tmp_path / "nowhere.yaml", profile, "no such file or folder"),
        (empty, profile, "not a delivery folder (no profile.yaml)"),
        (profile, profile, f"run `factory lock {profile}`"),  # no lock beside it
    ):
        result = run_factory("diff", str(old), str(new))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert run_factory("diff", str(profile)).returncode == 2  # a missing argument


def test_two_demo_profiles_one_pip_package_apart(tmp_path, test_channel):
    """The demo and a copy with one more pip package, each locked by `factory lock`: the
    diff names that package and nothing else, and exits 1; a profile against itself, 0."""

    def local_channel(profile: dict) -> None:
        profile["environments"][0]["channels"] = [str(test_channel)]

    def one_more(profile: dict) -> None:
        local_channel(profile)
        profile["environments"][0]["pip"].append("idna")

    old = demo_variant(tmp_path / "old", local_channel)
    new = demo_variant(tmp_path / "new", one_more)
    run_factory("lock", str(old), check=True)
    # The copy starts from the original's locks, as a copied profile does: only 'demo' solves.
    shutil.copytree(
        tmp_path / "old" / "demo.lock", tmp_path / "new" / "demo.lock", dirs_exist_ok=True
    )
    run_factory("lock", str(new), check=True)

    result = run_factory("diff", str(old), str(new))
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(r"environment demo, pip packages:\n  \+ idna \S+\n", result.stdout)
    markdown = run_factory("diff", str(old), str(new), "--markdown")
    assert markdown.returncode == 1
    rows = [line for line in markdown.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| Package | Before | After | Change |"
    assert re.fullmatch(r"\| idna \|  \| \S+ \| added \|", rows[1]) and len(rows) == 2
    same = run_factory("diff", str(old), str(old), "--format", "markdown")
    assert same.returncode == 0 and "No differences." in same.stdout
