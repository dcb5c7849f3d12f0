"""audit: auditd runs the login, sudo and token rules, locked; sudo and logins are on record;
logs are kept as long as the profile says; Jupyter access is logged."""

from factory.validate.audit import check_audit
from tests.validate.conftest import failed, statuses

RULES = "sudo auditctl -l"
STATUS = "sudo auditctl -s"
RETENTION = "systemd-analyze cat-config systemd/journald.conf; cat /etc/logrotate.d/nginx"
AUDITD = "sudo cat /etc/audit/auditd.conf"
LOGINS = "sudo journalctl -b --no-pager -o cat _COMM=sshd | grep -c 'Accepted publickey'"
ACCESS = "sudo grep -c 'GET /api/' /var/log/nginx/jupyter-access.log"


def test_the_recorded_audit_trail_passes(ctx):
    results = check_audit(ctx)
    assert "audit: logs are kept 2555 days" in statuses(results) and len(results) == 6
    assert failed(results) == {}


def test_missing_the_token_rule_fails(ctx, target):
    rules = target.commands[RULES].stdout.replace("-k factory-jupyter-token", "")
    target.answer(RULES, stdout=rules)
    assert list(failed(check_audit(ctx))) == [
        "audit: auditd is active with the login, sudo and token rules"
    ]


def test_unlocked_rules_fail(ctx, target):
    target.answer(STATUS, stdout=target.commands[STATUS].stdout.replace("enabled 2", "enabled 1"))
    assert list(failed(check_audit(ctx))) == [
        "audit: rules are locked and auditd never stops recording silently"
    ]


def test_auditd_that_suspends_on_a_full_disk_fails(ctx, target):
    config = target.commands[AUDITD].stdout
    target.answer(
        AUDITD, stdout=config.replace("disk_full_action = SINGLE", "disk_full_action = SUSPEND")
    )
    assert list(failed(check_audit(ctx))) == [
        "audit: rules are locked and auditd never stops recording silently"
    ]


def test_a_shorter_journal_retention_fails(ctx, target):
    config = target.commands[RETENTION].stdout.replace(
        "MaxRetentionSec=2555day", "MaxRetentionSec=30day"
    )
    target.answer(RETENTION, stdout=config)
    assert list(failed(check_audit(ctx))) == ["audit: logs are kept 2555 days"]


def test_no_recorded_key_login_fails(ctx, target):
    target.answer(LOGINS, stdout="0\n", exit_code=1)
    assert list(failed(check_audit(ctx))) == ["audit: logins are kept in the persistent journal"]


def test_an_empty_jupyter_access_log_fails(ctx, target):
    target.answer(ACCESS, stdout="0\n", exit_code=1)
    assert list(failed(check_audit(ctx))) == ["audit: Jupyter access is logged"]


def test_the_audit_asks_jupyter_through_nginx_before_reading_its_log(ctx, target, monkeypatch):
    """`--only audit` runs no https check: the audit makes the request it then looks for."""
    asked = []
    recorded = target.request

    def request(port, path, headers=None, **options):
        asked.append((port, path, list(target.ran)))
        return recorded(port, path, headers, **options)

    monkeypatch.setattr(target, "request", request)
    assert failed(check_audit(ctx)) == {}
    ((port, path, ran_before),) = asked
    assert (port, path) == (443, "/api/status")
    assert ACCESS not in ran_before and ACCESS in target.ran
