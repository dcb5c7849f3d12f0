"""ssh: no root or password logins, by config and by trying; tight limits; only the
profile's keys."""

from factory.validate.ssh import check_ssh_hardening
from tests.validate.conftest import failed, statuses

SSHD = "sudo sshd -T"


def test_the_recorded_sshd_passes(ctx):
    results = check_ssh_hardening(ctx)
    assert failed(results) == {}
    assert "ssh: root login with an authorised key is refused" in statuses(results)
    assert "ssh: password login is refused" in statuses(results)


def test_the_root_probe_authorises_the_key_and_removes_it_again(ctx, target):
    check_ssh_hardening(ctx)
    authorise = next(i for i, c in enumerate(target.ran) if "/root/.ssh/authorized_keys" in c)
    assert target.ran[authorise + 1] == "sudo rm -f /root/.ssh/authorized_keys"


def test_sshd_permitting_root_fails(ctx, target):
    config = target.commands[SSHD].stdout.replace("permitrootlogin no", "permitrootlogin yes")
    target.answer(SSHD, stdout=config)
    assert list(failed(check_ssh_hardening(ctx))) == ["ssh: sshd denies root login"]


def test_more_tries_than_three_fails(ctx, target):
    target.answer(
        SSHD, stdout=target.commands[SSHD].stdout.replace("maxauthtries 3", "maxauthtries 6")
    )
    assert list(failed(check_ssh_hardening(ctx))) == [
        "ssh: no X11 forwarding, 3 tries and 30 s to log in"
    ]


def test_an_accepted_root_login_fails(ctx, target):
    target.logins["root with a key"] = "accepted"
    assert failed(check_ssh_hardening(ctx)) == {
        "ssh: root login with an authorised key is refused": "accepted"
    }


def test_an_accepted_password_fails(ctx, target):
    target.logins["analyst with a password"] = "accepted"
    assert list(failed(check_ssh_hardening(ctx))) == ["ssh: password login is refused"]


def test_a_key_beyond_the_profile_fails(ctx, target):
    command = "sudo cat ~analyst/.ssh/authorized_keys"
    recorded = target.commands[command].stdout
    validator = target.public_key()  # a key the profile does not list
    target.answer(command, stdout=recorded + validator + "\n")
    assert failed(check_ssh_hardening(ctx)) == {
        "ssh: analyst has exactly the profile's keys": "2 key(s) installed, 1 in the profile"
    }


def test_a_live_host_is_not_probed_with_logins(ctx):
    ctx.throwaway_vm = False
    names = statuses(check_ssh_hardening(ctx))
    assert "ssh: password login is refused" not in names
    assert "ssh: root login with an authorised key is refused" not in names
    assert not any("/root/.ssh" in command for command in ctx.target.ran)
