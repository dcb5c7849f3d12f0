"""What `factory verify --profile` accepts as validated: a report that passed for the OVA
SHA256SUMS lists and ran the groups asked for (every group unless --only says fewer). The
real deliveries are verified in test_provenance.py and test_slurm_plan.py."""

import json
from pathlib import Path

import pytest

from factory.validate.suites import SUITES
from factory.verify import _validation_finding

OVA_SHA256 = "ab" * 32


def _delivery(folder: Path, only: list[str] | None, failed: int = 0) -> Path:
    subject = {"ova": {"name": "demo.ova", "sha256": OVA_SHA256}}
    if only is not None:
        subject["only"] = only
    report = {"created": "today", "subject": subject, "summary": {"passed": 9, "failed": failed}}
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "SHA256SUMS").write_text(f"{OVA_SHA256}  demo.ova\n")
    return folder


@pytest.mark.parametrize(
    ("checked", "wanted", "ok"),
    [
        (None, None, True),  # a full validation covers every group
        (None, ("env",), True),
        (["env", "lock"], ("env", "lock"), True),
        (["env", "lock"], ("env",), True),
        (["env", "lock"], None, False),  # a full plan does not skip a partial validation
        (["env"], ("env", "lock"), False),
    ],
)
def test_a_validation_counts_for_the_groups_it_ran(tmp_path, checked, wanted, ok):
    finding = _validation_finding(_delivery(tmp_path, checked), wanted)
    assert finding.ok is ok, finding.detail
    if not ok:
        missing = [g for g in (wanted or SUITES) if g not in checked]
        assert f"not for {', '.join(missing)}" in finding.detail
    elif checked:
        assert f"(only {', '.join(checked)})" in finding.detail


def test_a_failed_validation_never_counts(tmp_path):
    assert not _validation_finding(_delivery(tmp_path, ["env"], failed=1), ("env",)).ok
