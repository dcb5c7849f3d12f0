"""updates: every security update of the image's security index is installed, and automatic
updates are off as the demo profile says."""

from factory.validate.updates import check_updates
from tests.validate.conftest import failed

PACKAGES = "dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\\n'"
UNATTENDED = "apt-config dump APT::Periodic::Unattended-Upgrade"
TIMER = "systemctl is-enabled apt-daily-upgrade.timer"


def test_the_recorded_image_is_patched_and_updates_are_off(ctx):
    installed, automatic = check_updates(ctx)
    assert installed.name.startswith("updates: every security update of bookworm-security")
    assert automatic.name == "updates: automatic security updates are off"
    assert failed([installed, automatic]) == {}


def test_a_package_older_than_its_security_update_fails(ctx, target):
    index = ctx.extra["security_index"]
    listing = target.commands[PACKAGES].stdout
    line = next(row for row in listing.splitlines() if row.split()[1] in index.packages)
    package = line.split()[1]
    target.answer(PACKAGES, stdout=listing.replace(line, f"ii  {package} 0.0-1"))
    installed, _ = check_updates(ctx)
    assert installed.status == "failed" and installed.detail.startswith(package)


def test_an_image_built_without_a_security_suite_fails(ctx):
    ctx.extra["security_index"] = None
    installed, _ = check_updates(ctx)
    assert (installed.status, installed.detail) == (
        "failed",
        "the image was built without a security suite",
    )


def test_automatic_updates_switched_on_against_the_profile_fail(ctx, target):
    target.answer(UNATTENDED, stdout='APT::Periodic::Unattended-Upgrade "1";\n')
    target.answer(TIMER, stdout="enabled\n", exit_code=0)
    _, automatic = check_updates(ctx)
    assert automatic.status == "failed", automatic.detail
