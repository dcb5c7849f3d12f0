"""The layered build for real: a rebuild of an unchanged profile runs no packer, a changed lock
rebuilds only its own layer and those above it, and a build stopped in an environment layer
starts again from that layer. Each runs after the demo build (the demo_delivery fixture), so
its base, system and conda layers are in the session's layer store."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import DEMO_PROFILE, demo_variant, forget_layer, require_root, run_factory
from tests.test_e2e import assert_host_install_released, interrupt_when

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def _needs_root():
    require_root()


def layer_lines(output: str) -> dict[str, str]:
    """{layer: 'hit' | 'miss ...'} from a build's 'layer X: hit' progress lines."""
    found = {}
    for line in output.splitlines():
        text = line.split("]", 1)[-1].strip()
        if text.startswith("layer ") and (": hit" in text or ": miss" in text):
            name, _, verdict = text.removeprefix("layer ").partition(": ")
            found[name] = verdict
    return found


def fake_packer(folder: Path) -> dict[str, str]:
    """A PATH whose `packer` answers `version` and records any other call, then fails."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "packer-was-run"
    script = folder / "packer"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = version ]; then echo "Packer v1.6.6"; exit 0; fi\n'
        f'echo "$@" >> {marker}\n'
        "exit 1\n"
    )
    script.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


def test_explain_names_the_changed_input_and_builds_nothing(demo_delivery, tmp_path):
    variant = demo_variant(tmp_path / "profile", lambda p: p.update(notebooks=[]))
    result = run_factory("build", str(variant), "--outputs", str(tmp_path / "out"), "--explain")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "hit" in rows["system"] and "hit" in rows["conda"]
    assert "miss" in rows["client"] and "payload" in rows["client"]
    assert not (tmp_path / "out" / "demo_hello_v1").exists()


def test_a_build_stopped_in_an_environment_layer_resumes_from_it(demo_delivery, tmp_path):
    """One more pip package changes the demo environment's lock. SIGTERM while that layer is
    installed leaves no mount, loop device or export behind; the next build takes the system,
    conda and Jupyter layers from the store and starts at the demo environment."""
    variant = demo_variant(
        tmp_path / "profile", lambda p: p["environments"][0]["pip"].append("idna")
    )
    outputs = tmp_path / "out"
    forget_layer(variant, "env demo", tmp_path)  # stored by an earlier run of this test
    args = ["build", str(variant), "--outputs", str(outputs)]
    stderr = interrupt_when(args, "installing the environment demo", signal.SIGTERM)
    assert "interrupted; nothing was published" in stderr
    assert_host_install_released(outputs)
    assert layer_lines(stderr)["env demo"].startswith("miss (changed: lock)")

    result = run_factory(*args, "--events", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    layers = layer_lines(result.stderr)
    assert layers["system"] == layers["conda"] == layers["env jupyter"] == "hit", layers
    assert layers["env demo"].startswith("miss") and layers["client"].startswith("miss")
    # The same, as a scheduler reads it: one JSON line per stage start and end, then the end.
    events = [json.loads(line) for line in result.stdout.splitlines()]
    ends = {e["stage"]: e for e in events if e["event"] == "stage-end"}
    assert all(e["status"] == "ok" and e["profile"] == "demo_hello_v1" for e in ends.values())
    caches = {name: ends[name]["cache"] for name in ("system", "conda", "env demo", "client")}
    assert caches == {"system": "hit", "conda": "hit", "env demo": "miss", "client": "miss"}
    assert ends["env demo"]["seconds"] > ends["system"]["seconds"]
    assert list(ends)[:3] == ["lock", "installer", "base"] and "export" in ends
    assert events[-1]["event"] == "build-end" and events[-1]["exit_code"] == 0
    assert events[-1]["delivery"] == str(outputs / "demo_hello_v1")
    delivery = outputs / "demo_hello_v1"
    lock = (delivery / "locks" / "demo.lock.json").read_text()
    assert '"idna"' in lock


def test_profiles_built_together_share_their_layers_and_run_no_packer(demo_delivery, tmp_path):
    """Three profiles with --jobs 2 and a `packer` that records any build: the demo (every
    layer stored), its version 2 (only the client layer differs) and a broken copy. Neither
    good one runs packer; the broken one fails alone; the table names all three and the exit
    status says that one failed."""
    env = fake_packer(tmp_path / "bin")
    second = demo_variant(tmp_path, lambda p: p.update(version=2), "demo-v2.yaml")
    broken = demo_variant(tmp_path, lambda p: p["resources"].update(cpus=0), "broken.yaml")
    forget_layer(second, "client", tmp_path / "forget")  # stored by an earlier run of this test
    outputs = tmp_path / "out"
    result = run_factory(
        "build", str(DEMO_PROFILE), str(second), str(broken), "--jobs", "2",
        "--outputs", str(outputs), env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr  # the broken one's code
    assert not (tmp_path / "bin" / "packer-was-run").exists()
    assert (outputs / "demo_hello_v1" / "demo_hello_v1.ova").is_file()
    assert (outputs / "demo_hello_v2" / "demo_hello_v2.ova").is_file()
    rows = {
        Path(line.split()[0]).name: line
        for line in result.stdout.splitlines()
        if line.strip() and line.split()[0].endswith(".yaml")
    }
    assert "passed" in rows["demo.yaml"] and "passed" in rows["demo-v2.yaml"], result.stdout
    assert "FAILED" in rows["broken.yaml"] and "cpus" in rows["broken.yaml"], result.stdout
    unchanged = layer_lines((outputs / "logs" / "demo.build.log").read_text())
    assert set(unchanged) == {"system", "conda", "env jupyter", "env demo", "client"}
    assert all(verdict == "hit" for verdict in unchanged.values()), unchanged
    version_2 = layer_lines((outputs / "logs" / "demo-v2.build.log").read_text())
    assert version_2["system"] == version_2["env demo"] == "hit", version_2
    assert version_2["client"].startswith("miss"), version_2
