"""gpu: the demo has no GPU target, so neither level runs a command or reports a result. A GPU
profile checked on a real machine without the driver (recorded/gpu_host_without_driver.json)
fails level 1 for exactly the missing pieces and skips level 2, never passing it."""

import json

from factory.profile import load_profile
from factory.validate.context import FAILED, SKIPPED, CheckContext
from factory.validate.gpu import check_gpu_level1, check_gpu_level2
from factory.validate.target import ScriptedTarget
from tests.validate.conftest import RECORDED, REPO


def test_a_profile_without_a_gpu_asks_the_machine_nothing(ctx, target):
    assert ctx.loaded.profile.gpu is None
    assert check_gpu_level1(ctx) == [] and check_gpu_level2(ctx) == []
    assert target.ran == []


def test_a_machine_without_the_driver_fails_level_one_and_skips_level_two():
    recording = json.loads((RECORDED / "gpu_host_without_driver.json").read_text())
    target = ScriptedTarget(recording, description="recorded host without a GPU driver")
    ctx = CheckContext(
        target=target, loaded=load_profile(REPO / "profiles" / "demo-gpu.yaml"), throwaway_vm=False
    )
    level1, level2 = check_gpu_level1(ctx), check_gpu_level2(ctx)
    assert {r.name: r.status for r in level1} == {
        "gpu: driver 535 is installed": FAILED,
        "gpu: kernel module built for the booted kernel": FAILED,
        "gpu: nvidia-smi is present": FAILED,
    }
    assert "no NVIDIA driver package" in level1[0].detail
    assert [(r.name, r.status) for r in level2] == [("gpu: nvidia-smi lists the device", SKIPPED)]
    assert "no GPU" in level2[0].detail
