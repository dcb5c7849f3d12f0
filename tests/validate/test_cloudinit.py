"""cloud-init: the first boot finished without errors."""

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


def test_a_boot_without_a_seed_where_cloud_init_stayed_off_passes(ctx, target):
    """Booted as an importer boots it, cloud-init's generator finds no datasource."""
    target.answer(
        STATUS,
        stdout="status: disabled\nboot_status_code: disabled-by-generator\n"
        "detail:\nCloud-init disabled by cloud-init-generator\n",
    )
    (result,) = check_cloud_init(ctx)
    assert result.status == "passed"
    assert result.detail == "status: disabled (no seed disk: no datasource found)"


def test_cloud_init_switched_off_by_hand_fails(ctx, target):
    target.answer(
        STATUS,
        stdout="status: disabled\nboot_status_code: disabled-by-marker-file\n"
        "detail:\nCloud-init disabled by /etc/cloud/cloud-init.disabled\n",
    )
    (result,) = check_cloud_init(ctx)
    assert result.status == "failed" and result.detail == "status: disabled"
