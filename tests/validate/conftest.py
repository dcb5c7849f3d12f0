"""Checks replayed against a recording of a real validation boot of the demo delivery
(recorded/demo_hello_v1.json, made with FACTORY_RECORD_COMMANDS; see recorded/README.md).
A passing case replays the recording as it is; a failing case edits the one answer the check
exists to catch."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from factory import cpu
from factory.profile import LoadedProfile, load_profile
from factory.updates import SecurityIndex
from factory.validate.context import PASSED, CheckContext, CheckResult
from factory.validate.target import ScriptedTarget

REPO = Path(__file__).resolve().parent.parent.parent
RECORDED = Path(__file__).resolve().parent / "recorded"
RECORDING = RECORDED / "demo_hello_v1.json"
DELIVERY = RECORDED / "demo_hello_v1"  # the parts of the delivery that validation reads


def recording() -> dict:
    return json.loads(RECORDING.read_text())


def command_with(target: ScriptedTarget, start: str) -> str:
    """The one recorded command that starts with `start`."""
    found = [command for command in target.commands if command.startswith(start)]
    assert len(found) == 1, f"{len(found)} recorded commands start with {start!r}"
    return found[0]


def statuses(results: list[CheckResult]) -> dict[str, str]:
    return {r.name: r.status for r in results}


def failed(results: list[CheckResult]) -> dict[str, str]:
    """{name: detail} of the results that did not pass."""
    return {r.name: r.detail for r in results if r.status != PASSED}


def copy_delivery(folder: Path) -> Path:
    """The recorded delivery's parts in `folder`, loadable on any machine. The delivered profile
    names its sample notebook beside itself (the demo's own, kept out of tests/, where ruff
    would lint it as code) and its channel by the recording machine's cache path, which the
    checks never read: it is pointed at a folder inside the copy."""
    shutil.copytree(DELIVERY, folder, dirs_exist_ok=True)
    (folder / "notebooks").mkdir()
    shutil.copy(REPO / "profiles" / "notebooks" / "demo-credit-score.ipynb", folder / "notebooks")
    (folder / "channel").mkdir()
    profile = folder / "profile.yaml"
    text = profile.read_text()
    recorded_channel = re.search(r"^  - (file://\S+)$", text, flags=re.MULTILINE)
    assert recorded_channel, "the recorded profile names no local channel"
    profile.write_text(text.replace(recorded_channel.group(1), "channel"))
    return folder


@pytest.fixture(scope="session")
def loaded(tmp_path_factory) -> LoadedProfile:
    folder = copy_delivery(tmp_path_factory.mktemp("delivery"))
    return load_profile(folder / "profile.yaml")


@pytest.fixture
def target() -> ScriptedTarget:
    return ScriptedTarget(recording(), description="recorded demo_hello_v1")


@pytest.fixture
def ctx(target: ScriptedTarget, loaded: LoadedProfile) -> CheckContext:
    """The context validate_delivery gave the checks on the recorded boot."""
    locks = [json.loads(p.read_text()) for p in sorted((DELIVERY / "locks").glob("*.lock.json"))]
    index = SecurityIndex.from_json(json.loads((DELIVERY / "security-index.json").read_text()))
    meta = recording()["meta"]
    return CheckContext(
        target=target,
        loaded=loaded,
        throwaway_vm=True,
        locks=locks,
        unlisted_port=meta["unlisted_port"],
        extra={
            "cpu": cpu.validation_cpu(loaded.profile.cpu_baseline, meta["accelerator"]),
            "security_index": index,
        },
    )
