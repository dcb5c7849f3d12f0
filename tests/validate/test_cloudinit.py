"""cloud-init: the first boot finished without errors."""

import pytest

from factory.validate.cloudinit import check_cloud_init

STATUS = "cloud-init status --wait --long"


def test_the_recorded_first_boot_is_done(ctx):
    (result,) = check_cloud_init(ctx)
    assert (result.status, result.detail) == ("passed", "status: done")


def test_a_first_boot_that_ended_in_error_fails(ctx, target):
    recorded = target.commands[STATUS].stdout
    edited = recorded.replace("status: done", "status: error").replace(
        "detail:", "errors:\n\t- ('scripts_user', RuntimeError('runparts: 1 failed'))\ndetail:"
    )
    target.answer(STATUS, stdout=edited, exit_code=1)
    (result,) = check_cloud_init(ctx)
    assert result.status == "failed" and "status: error" in result.detail


@pytest.mark.parametrize(
    ("boot_status", "reason", "status", "detail"),
    [
        # Booted as an importer boots it: cloud-init's generator found no datasource.
        ("disabled-by-generator", "cloud-init-generator", "passed",
         "status: disabled (no seed disk: no datasource found)"),
        ("disabled-by-marker-file", "/etc/cloud/cloud-init.disabled", "failed", "status: disabled"),
    ],
)  # fmt: skip
def test_cloud_init_that_stayed_off_passes_only_without_a_seed(
    ctx, target, boot_status, reason, status, detail
):
    target.answer(
        STATUS,
        stdout=f"status: disabled\nboot_status_code: {boot_status}\n"
        f"detail:\nCloud-init disabled by {reason}\n",
    )
    (result,) = check_cloud_init(ctx)
    assert (result.status, result.detail) == (status, detail)
