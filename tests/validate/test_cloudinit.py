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
