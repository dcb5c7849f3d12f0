"""offline: no egress, package tools point only inside, and a new environment is made from
the baked channel in a temporary folder that is removed again."""

from factory.validate.offline import check_offline
from tests.validate.conftest import command_with, failed, statuses

EGRESS = "curl -s -m 10 -o /dev/null http://deb.debian.org/debian/"
CONFIG = "cat /opt/conda/.condarc /etc/pip.conf"
MKTEMP = "sudo mktemp -d /var/tmp/factory-probe.XXXXXXXX"
CREATE = "sudo python3 -c '\nimport importlib.machinery"


def test_the_recorded_air_gapped_image_passes(ctx, target):
    results = check_offline(ctx)
    assert len(results) == 4 and "offline: pip installs tabulate from the wheelhouse" in statuses(
        results
    )
    assert failed(results) == {}
    work = target.commands[MKTEMP].stdout.strip()
    assert target.ran[-1] == f"sudo rm -rf -- {work}"


def test_a_guest_that_reaches_the_internet_fails(ctx, target):
    target.answer(EGRESS, exit_code=0)
    assert failed(check_offline(ctx)) == {
        "offline: the guest has no network egress": "curl to Debian's mirror exit 0"
    }


def test_a_condarc_with_a_public_channel_fails(ctx, target):
    config = target.commands[CONFIG].stdout.replace(
        "  - file:///opt/factory/channel\n", "  - file:///opt/factory/channel\n  - conda-forge\n"
    )
    target.answer(CONFIG, stdout=config)
    assert list(failed(check_offline(ctx))) == [
        "offline: .condarc and pip.conf point only at the image"
    ]


def test_an_environment_that_cannot_be_made_fails(ctx, target):
    command = command_with(target, CREATE)
    target.answer(
        command, exit_code=1, stdout="", stderr="factory-env: six is not in the baked channel\n"
    )
    assert failed(check_offline(ctx)) == {
        "offline: a new environment is created from the baked channel": (
            "factory-env: six is not in the baked channel"
        )
    }


def test_an_unexpected_temporary_folder_is_never_used_or_removed(ctx, target):
    target.answer(MKTEMP, stdout="/\n")
    results = check_offline(ctx)
    assert failed(results) == {
        "offline: a new environment is created from the baked channel": (
            "cannot make a temporary folder: /"
        )
    }
    assert not any(command.startswith("sudo rm -rf") for command in target.ran)
