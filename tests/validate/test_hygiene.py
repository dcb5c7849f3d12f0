"""credentials and hygiene: nothing of the build's login is left, and no private key, token
or password exists beyond what this boot made where first boot makes it."""

from factory.validate.hygiene import check_build_credentials_removed, check_image_hygiene
from tests.validate.conftest import command_with

BUILD_USER = "getent passwd factory-build"
BUILD_FILES = "sudo sh -c 'ls -d /home/factory-build"
KEYS = "sudo grep -rlI --exclude-dir=proc -f /dev/stdin"
TOKENS = "sudo grep -rlIE -e 'JUPYTER_TOKEN="
SHADOW = "sudo awk -F: '$2 !~ /^[!*]/ {print $1}' /etc/shadow"
JOURNAL = "sudo bash -c 'exec 3<&0; journalctl"
STAMPS = "awk '/^btime/ {print $2}' /proc/stat;"


def hygiene_detail(ctx) -> tuple[str, str]:
    (result,) = check_image_hygiene(ctx)
    return result.status, result.detail


def test_the_recorded_image_has_no_build_credentials(ctx):
    (result,) = check_build_credentials_removed(ctx)
    assert result.status == "passed", result.detail


def test_a_leftover_build_user_fails(ctx, target):
    target.answer(
        BUILD_USER, exit_code=0, stdout="factory-build:x:1000:1000::/home/factory-build:/bin/bash\n"
    )
    (result,) = check_build_credentials_removed(ctx)
    assert (result.status, result.detail) == ("failed", "user factory-build")


def test_a_leftover_payload_fails(ctx, target):
    target.answer(command_with(target, BUILD_FILES), exit_code=0, stdout="/tmp/factory-payload\n")
    (result,) = check_build_credentials_removed(ctx)
    assert (result.status, result.detail) == ("failed", "/tmp/factory-payload")


def test_the_recorded_image_is_clean(ctx):
    status, detail = hygiene_detail(ctx)
    assert status == "passed", detail


def test_a_private_key_outside_first_boot_files_fails(ctx, target):
    command = command_with(target, KEYS)
    target.answer(
        command, stdout=target.commands[command].stdout + "/home/analyst/.ssh/id_ed25519\n"
    )
    assert hygiene_detail(ctx) == ("failed", "private key in /home/analyst/.ssh/id_ed25519")


def test_the_token_in_another_file_fails(ctx, target):
    command = command_with(target, TOKENS)
    target.answer(command, stdout=target.commands[command].stdout + "/var/log/cloud-init.log\n")
    assert hygiene_detail(ctx) == ("failed", "token in /var/log/cloud-init.log")


def test_the_token_in_the_journal_fails(ctx, target):
    target.answer(command_with(target, JOURNAL), stdout="2\n", exit_code=0)
    assert hygiene_detail(ctx) == ("failed", "2 journal line(s) hold the token or a private key")


def test_a_user_with_a_password_fails(ctx, target):
    target.answer(SHADOW, stdout="analyst\n")
    assert hygiene_detail(ctx) == ("failed", "user analyst has a password")


def test_a_host_key_baked_into_the_image_fails(ctx, target):
    command = command_with(target, STAMPS)
    boot, *stamps = target.commands[command].stdout.splitlines()
    older = int(boot) - 86400
    stamps[0] = f"/etc/ssh/ssh_host_ed25519_key {older} {older}"
    target.answer(command, stdout="\n".join([boot, *stamps]) + "\n")
    assert hygiene_detail(ctx) == ("failed", "/etc/ssh/ssh_host_ed25519_key predates this boot")


def test_a_missing_first_boot_secret_fails(ctx, target):
    command = command_with(target, STAMPS)
    lines = target.commands[command].stdout.splitlines()
    kept = [line for line in lines if "jupyter.env" not in line]
    target.answer(command, stdout="\n".join(kept) + "\n", exit_code=1)
    assert hygiene_detail(ctx) == ("failed", "1 first-boot secret(s) missing")
