"""gpu: the demo has no GPU target, so neither level runs a command or reports a result. The
recorded boot has no GPU answers; a GPU profile's checks are driven by tests/test_gpu.py."""

from factory.validate.gpu import check_gpu_level1, check_gpu_level2


def test_a_profile_without_a_gpu_asks_the_machine_nothing(ctx, target):
    assert ctx.loaded.profile.gpu is None
    assert check_gpu_level1(ctx) == [] and check_gpu_level2(ctx) == []
    assert target.ran == []
