"""The CI ratio's figures from benchmarks/ci_ratio.sh's work folder: each run's JUnit file,
its .ci/run seconds and its commit. Writes them, and the ratios, to a JSON file and prints them.

    python3 -m benchmarks.ci_ratio_summary WORK OLD_REV NEW_REV RESULTS_JSON
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from factory.tables import format_table


def run_figures(work: Path, tag: str, rev: str) -> dict:
    """One cold run: its commit, pytest's and .ci/run's seconds, and its test counts."""
    junit = work / f"{tag}.xml"
    if not junit.is_file():
        raise SystemExit(f"ci-ratio: the {tag} run ({rev}) wrote no JUnit; see {work}/{tag}.log")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    commit = (work / f"{tag}.commit").read_text().strip()
    seconds = int((work / f"{tag}.seconds").read_text())
    return {
        "rev": rev,
        "commit": commit,
        "pytest_seconds": float(suite.get("time")),
        "ci_run_seconds": seconds,
        **counts,
    }


def main(work: Path, old: str, new: str, results: Path) -> None:
    before, after = run_figures(work, "old", old), run_figures(work, "new", new)
    after["left_out"] = (work / "left-out.txt").read_text().split()
    figures = {
        "before": before,
        "after": after,
        "ratio_pytest": round(after["pytest_seconds"] / before["pytest_seconds"], 3),
        "ratio_ci_run": round(after["ci_run_seconds"] / before["ci_run_seconds"], 3),
    }
    results.write_text(json.dumps(figures, indent=1) + "\n")
    rows = [
        [name, str(run["tests"]), str(run["failures"] + run["errors"])]
        + [str(round(run["pytest_seconds"])), str(run["ci_run_seconds"])]
        for name, run in (("before", before), ("after", after))
    ]
    print(format_table(["run", "tests", "failed", "pytest s", ".ci/run s"], rows))
    print(f"ratio: {figures['ratio_pytest']:.3f} (pytest), {figures['ratio_ci_run']:.3f} (.ci/run)")
    print(f"written to {results}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
