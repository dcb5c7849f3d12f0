"""Reports: every check result, whatever its remote output held, is written to all three."""

import json
import xml.etree.ElementTree as ET

from factory.validate.context import FAILED, PASSED, CheckResult
from factory.validate.report import write_reports

# The last line of an nbclient traceback, as a failing sample notebook prints it.
COLOURED = "\x1b[0;31mValueError\x1b[0m: boom\x00"


def test_control_characters_in_a_detail_do_not_break_any_report(tmp_path):
    results = [
        CheckResult("notebooks: sample.ipynb runs headless", FAILED, COLOURED, group="notebooks"),
        CheckResult("title", PASSED, "\x1b]0;title\x07ok\x0b\x1bc", group="image"),
    ]
    assert results[0].detail == "ValueError: boom"
    assert results[1].detail == "ok"
    paths = write_reports(results, tmp_path, {"name": "demo_hello_v1", "target": "test"})
    assert [p.name for p in paths] == ["report.json", "report.xml", "report.html"]
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["checks"][0]["detail"] == "ValueError: boom"
    tree = ET.parse(tmp_path / "report.xml")
    failure = tree.find(".//testcase[@name='notebooks: sample.ipynb runs headless']/failure")
    assert failure is not None and failure.get("message") == "ValueError: boom"
    html = (tmp_path / "report.html").read_text()
    assert "<code>ValueError: boom</code>" in html
    for path in paths:
        text = path.read_text()
        assert "\x1b" not in text and "\x00" not in text


def test_the_html_report_says_when_only_some_groups_ran(tmp_path):
    results = [CheckResult("env: numpy imports", PASSED, "ok", group="env")]
    full, partial = tmp_path / "full", tmp_path / "partial"
    write_reports(results, full, {"name": "demo_hello_v1", "target": "test"})
    write_reports(results, partial, {"name": "demo_hello_v1", "target": "test", "only": ["env"]})
    assert "were checked" not in (full / "report.html").read_text()
    assert "Only the groups env were checked" in (partial / "report.html").read_text()
