"""The chain as the user sees it: `factory --help` in pipeline order, and the per-stage timings
a real build records in its manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from factory.cache import sha256_file
from factory.pipeline import Steps
from tests.conftest import run_factory

STAGES = ["lock", "installer", "base", "render", "bundle", "system", "conda", "env jupyter",
          "env demo", "client", "export"]  # fmt: skip


def test_help_lists_the_pipeline_in_order_then_the_tools():
    text = run_factory("--help", check=True).stdout
    pipeline, tools = text.split("Pipeline, in order:")[1].split("Tools:")
    listed = re.findall(r"^  (\S+)", pipeline, flags=re.MULTILINE)
    assert listed == ["lock", "bundle", "base", "render", "build", "export", "validate", "deploy"]
    assert {"credentials", "diff", "doctor", "new", "release", "schema"} <= set(tools.split())


class _Quiet:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def set_stage(self, name: str) -> None:
        self.lines.append(name)

    def log(self, line: str) -> None:
        self.lines.append(line)


def test_a_stage_that_fails_is_not_recorded_as_done():
    steps = Steps(_Quiet())  # type: ignore[arg-type]
    with steps.step("lock"):
        pass
    with pytest.raises(RuntimeError), steps.step("base"):
        raise RuntimeError("mirror unreachable")
    assert [record["name"] for record in steps.records] == ["lock"]
    assert steps.records[0]["seconds"] >= 0
    assert [line.split(" in ")[0] for line in steps.progress.lines] == [
        "lock",
        "lock done",
        "base",
    ]


@pytest.mark.e2e
def test_the_manifest_records_every_stage_of_a_real_build(demo_delivery: Path):
    manifest = json.loads((demo_delivery / "manifest.json").read_text())
    stages = manifest["stages"]
    assert [stage["name"] for stage in stages] == STAGES
    assert all(stage["seconds"] >= 0 for stage in stages)
    # The VM stages take real time; the sum never exceeds the whole build.
    seconds = {stage["name"]: stage["seconds"] for stage in stages}
    # Built cold or taken from the layer store by an earlier build of the same session.
    assert all(seconds[name] >= 0 for name in ("system", "env demo", "client"))
    assert sum(seconds.values()) <= manifest["build"]["duration_s"] + 1
    assert {stage["log"] for stage in stages} <= {None, "build.log"}
    # The artifacts are hashed once for SHA256SUMS and the manifest: both name the files' sha256.
    sums = dict(
        reversed(line.split("  "))
        for line in (demo_delivery / "SHA256SUMS").read_text().split("\n")
        if line
    )
    for artifact in manifest["artifacts"]:
        assert artifact["sha256"] == sums[artifact["name"]]
        assert artifact["sha256"] == sha256_file(demo_delivery / artifact["name"])
