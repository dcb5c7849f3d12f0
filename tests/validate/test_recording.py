"""The recorder: wrapped around a target, it writes what the checks met in the form that
ScriptedTarget replays, so a recording of a recording gives the same results."""

import json

from factory.validate.recording import RECORD_ENV, Recording, RecordingTarget, recording_path
from factory.validate.suites import run_all_checks
from factory.validate.target import ScriptedTarget
from tests.validate.conftest import statuses


def test_a_recording_replays_to_the_same_results(ctx, target, tmp_path):
    first = run_all_checks(ctx)
    ctx.target = RecordingTarget(target, Recording(tmp_path / "again.json"))
    recorded = run_all_checks(ctx)
    again = json.loads((tmp_path / "again.json").read_text())
    assert set(again["commands"]) == set(target.ran)
    assert set(again["requests"]) == set(target.requests)
    assert set(again["logins"]) == set(target.logins)
    ctx.target = ScriptedTarget(again)
    assert statuses(run_all_checks(ctx)) == statuses(recorded) == statuses(first)


def test_a_failed_request_is_recorded_as_its_error(target, tmp_path):
    recorder = RecordingTarget(target, Recording(tmp_path / "r.json"))
    try:
        recorder.request(7777, "/", timeout=8)
    except TimeoutError:
        pass
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["requests"]["7777 /"] == {"error": ["TimeoutError", "timed out"]}


def test_recording_is_off_unless_asked_for(monkeypatch, tmp_path):
    monkeypatch.delenv(RECORD_ENV, raising=False)
    assert recording_path() is None
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "r.json"))
    assert recording_path() == tmp_path / "r.json"
