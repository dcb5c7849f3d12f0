"""The registry: replayed whole, the recording gives the very results the real run reported;
`only` picks groups; a check that crashes is reported as failed."""

import json

from factory.validate.suites import SUITES, run_all_checks
from tests.validate.conftest import DELIVERY, statuses

# Added by run.py around the registry: the importer's own boot and the first login.
AROUND_THE_REGISTRY = {"importer", "boot:ssh: login with the pinned host key"}


def reported() -> dict[str, str]:
    checks = json.loads((DELIVERY / "report.json").read_text())["checks"]
    return {
        c["name"]: c["status"]
        for c in checks
        if c["group"] not in AROUND_THE_REGISTRY
        and f"{c['group']}:{c['name']}" not in AROUND_THE_REGISTRY
    }


def test_the_replay_reports_what_the_real_boot_reported(ctx):
    results = run_all_checks(ctx)
    assert statuses(results) == reported()
    assert [r.name for r in results] == list(reported())


def test_only_runs_the_named_groups(ctx, target):
    results = run_all_checks(ctx, only=("ssh", "audit"))
    assert {r.group for r in results} == {"ssh", "audit"}
    assert not any("cpuinfo" in command for command in target.ran)


def test_a_crashing_check_is_a_failed_check(ctx, target):
    del target.commands["sudo sshd -T"]
    (result,) = run_all_checks(ctx, only=("ssh",))
    assert (result.name, result.status) == ("check crashed: KeyError", "failed")
    assert "sudo sshd -T" in result.detail


def test_every_group_the_registry_runs_is_a_suite_name(ctx):
    groups = {r.group.split(":")[0] for r in run_all_checks(ctx)}
    assert "importer" in SUITES and len(set(SUITES)) == len(SUITES)
    assert groups <= set(SUITES) | {"boot", "notebooks"}
