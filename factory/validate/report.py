"""Write one set of results as report.json, report.xml (JUnit) and report.html."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from junitparser import Failure, JUnitXml, Skipped, TestCase, TestSuite

from factory.templates import render_template
from factory.validate.context import FAILED, PASSED, SKIPPED, CheckResult


def summarise(results: list[CheckResult]) -> dict[str, int]:
    return {
        status: sum(r.status == status for r in results) for status in (PASSED, FAILED, SKIPPED)
    }


def _report_entry(result: CheckResult) -> dict:
    """A result as report.json lists it; the data a check read back is saved elsewhere."""
    entry = asdict(result)
    del entry["data"]
    return entry


def write_reports(results: list[CheckResult], out_dir: Path, subject: dict) -> list[Path]:
    """Write the three reports into out_dir and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    counts = summarise(results)
    document = {
        "subject": subject,
        "created": created,
        "summary": counts,
        "checks": [_report_entry(r) for r in results],
    }
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(document, indent=2) + "\n")

    suites: dict[str, TestSuite] = {}
    for result in results:
        suite = suites.setdefault(result.group, TestSuite(f"factory.{result.group}"))
        case = TestCase(result.name, classname=f"factory.{result.group}", time=result.seconds)
        if result.status == FAILED:
            case.result = [Failure(result.detail)]
        elif result.status == SKIPPED:
            case.result = [Skipped(result.detail)]
        case.system_out = result.detail
        suite.add_testcase(case)
    xml = JUnitXml("factory validate")
    for suite in suites.values():
        suite.update_statistics()
        xml.add_testsuite(suite)
    xml_path = out_dir / "report.xml"
    xml.write(str(xml_path), pretty=True)

    # A live host's subject has no CPU model; the strict template needs the key to exist.
    page_subject = {"cpu": None, **subject}
    html = render_template(
        "report.html.j2", subject=page_subject, created=created, summary=counts, results=results
    )
    html_path = out_dir / "report.html"
    html_path.write_text(html)
    return [json_path, xml_path, html_path]
