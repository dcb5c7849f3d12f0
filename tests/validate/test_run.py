"""validate_delivery's wiring, with the recorded boot standing in for QEMU and SSH: the
target reaches forwarded ports, every check runs, reports and environment exports are
written, and FACTORY_RECORD_COMMANDS records the run."""

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from factory.validate import SUITES, run, validate_delivery
from factory.validate.boot import VALIDATOR_USER
from factory.validate.recording import RECORD_ENV
from factory.validate.target import ScriptedTarget
from tests.validate.conftest import DELIVERY, copy_delivery, recording

FORWARDS = {22: 40022, 80: 40080, 443: 40443, 9100: 49100, 7777: 47777}


@pytest.fixture
def delivery(tmp_path, monkeypatch) -> tuple[Path, dict]:
    """A delivery folder whose OVA 'boots' into the recording; `seen` tells what was asked."""
    folder = copy_delivery(tmp_path / "demo_hello_v1")
    (folder / "report.json").unlink()  # the run writes its own
    (folder / "demo_hello_v1.ova").write_bytes(b"")
    seen: dict = {}

    @contextlib.contextmanager
    def booted(disk, memory_mib, cpus, accel, **options):
        seen["forward_ports"] = options["forward_ports"]
        key = SimpleNamespace(private_key_file=tmp_path / "key", public_key="ssh-ed25519 AAAA")
        yield SimpleNamespace(
            ssh_port=FORWARDS[22], host_keys=["ssh-ed25519 AAAA"], key=key,
            boot_seconds=1.0, forwards=FORWARDS, agent_socket=tmp_path / "agent.sock",
        )  # fmt: skip

    class Agent:
        def __init__(self, path, deadline):
            seen["agent"] = path

        def close(self):
            seen["agent closed"] = True

    def connect(host, port, user, key_file, host_keys, deadline, forwards=None):
        seen["connect"] = (host, port, forwards)
        return ScriptedTarget(recording())

    monkeypatch.setattr(run, "extract_ova_disk", lambda ova, scratch: scratch / "disk.vmdk")
    monkeypatch.setattr(run.kvm, "choose_accelerator", lambda requested: "tcg")
    monkeypatch.setattr(run, "boot_delivery", booted)
    monkeypatch.setattr(run, "connect", connect)
    monkeypatch.setattr(run, "GuestAgent", Agent)
    monkeypatch.setattr(run, "admit_login", lambda agent, user, key: seen.update(admitted=user))
    return folder, seen


def test_a_delivery_run_wires_the_target_to_the_forwarded_ports(delivery, tmp_path):
    folder, seen = delivery
    only = tuple(s for s in SUITES if s != "importer")  # its ports and agent are not recorded
    outcome = validate_delivery(folder, log=lambda line: None, only=only)
    assert outcome.failed == []
    assert seen["admitted"] == VALIDATOR_USER and seen["agent closed"]
    assert seen["connect"] == ("127.0.0.1", FORWARDS[22], FORWARDS)
    assert 7777 in seen["forward_ports"]
    report = json.loads((folder / "report.json").read_text())
    expected = json.loads((DELIVERY / "report.json").read_text())["checks"]
    assert [c["name"] for c in report["checks"]] == [
        c["name"] for c in expected if c["group"] != "importer"
    ]
    assert all("data" not in check for check in report["checks"])
    assert (folder / "envs" / "jupyter.pip-freeze.txt").read_text().count("==") > 10


def test_the_run_records_when_asked(delivery, tmp_path, monkeypatch):
    folder, _ = delivery
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "recorded.json"))
    validate_delivery(folder, report_dir=tmp_path / "reports", log=lambda line: None, only=("ssh",))
    saved = json.loads((tmp_path / "recorded.json").read_text())
    assert saved["meta"] == {"unlisted_port": 7777, "accelerator": "tcg"}
    assert "sudo sshd -T" in saved["commands"]
    assert saved["logins"] == {
        "root with a key": "refused (Authentication failed.)",
        "analyst with a password": "refused (server allows only publickey)",
    }
