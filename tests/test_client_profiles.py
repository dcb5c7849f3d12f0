"""The client profiles as written: each is built through the real chain on this host (its
build VM capped to what the host can give) and validated at its cpu_baseline, its sample
notebooks included, each on its own kernel. The demo's own e2e tests are in test_e2e.py."""

import json
import subprocess
import sys

import pytest

from tests.conftest import FACTORY, REPO, require_root, run_factory

pytestmark = pytest.mark.e2e

# Each profile's sample notebooks: {notebook: (the kernel it runs on, that kernel's python)}.
CLIENT_PROFILES = {
    "bank_credit_risk_v2": {"banking-credit-risk.ipynb": ("credit-risk", "3.11")},
    # Two Pythons side by side: the legacy model's kernel and the new project's.
    "factory_predictive_maintenance_v1": {
        "manufacturing-predictive-maintenance.ipynb": ("maintenance", "3.11"),
        "maintenance-next-remaining-life.ipynb": ("maintenance-next", "3.13"),
    },
}
# The client's own services: the bank's credit model behind a web API.
CLIENT_SERVICES = {"bank_credit_risk_v2": {"score": ("/health", 8601)}}


@pytest.fixture(scope="module")
def client_deliveries(demo_build_inputs, tmp_path_factory):
    """Both client profiles, unchanged, built together (`factory build A B --jobs 2`) and then
    validated at the same time, each in its own VM: {name: (delivery, validation)}."""
    require_root()
    outputs = tmp_path_factory.mktemp("outputs-clients")
    profiles = [str(REPO / "profiles" / f"{name}.yaml") for name in sorted(CLIENT_PROFILES)]
    build = run_factory("build", *profiles, "--jobs", "2", "--outputs", str(outputs))
    print(build.stdout, build.stderr[-3000:], file=sys.stderr)
    for log in sorted((outputs / "logs").glob("*.build.log")):
        print(log.name, log.read_text()[-4000:], file=sys.stderr)
    assert build.returncode == 0, build.stdout + build.stderr[-4000:]
    validations = {
        name: subprocess.Popen(
            [*FACTORY, "validate", str(outputs / name)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in sorted(CLIENT_PROFILES)
    }
    results = {}
    try:
        for name, process in validations.items():
            stdout, stderr = process.communicate(timeout=3600)
            print(stdout, stderr[-3000:], file=sys.stderr)
            results[name] = (
                outputs / name,
                subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
            )
    finally:
        for process in validations.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=120)
    yield results
    subprocess.run(["rm", "-rf", str(outputs)], check=False)


@pytest.fixture(params=sorted(CLIENT_PROFILES))
def client_delivery(request, client_deliveries):
    """One client profile's (name, delivery, validation)."""
    delivery, validation = client_deliveries[request.param]
    return request.param, delivery, validation


def test_client_profile_validates_with_its_notebook(client_delivery):
    name, delivery, validation = client_delivery
    assert validation.returncode == 0, validation.stdout[-6000:] + validation.stderr[-2000:]
    report = json.loads((delivery / "report.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    details = {c["name"]: c["detail"] for c in report["checks"]}
    # Every environment is a kernel that starts the environment's own python.
    assert statuses["jupyter: each environment is a kernel"] == "passed"
    for notebook, (kernel, python) in CLIENT_PROFILES[name].items():
        ran = f"notebooks: {notebook} runs headless"
        assert statuses[ran] == "passed", details[ran]
        assert details[ran].startswith(f"kernel {kernel}: "), details[ran]
        assert statuses[f"{kernel}: environment exists"] == "passed"
        assert statuses[f"{kernel}: python {python}"] == "passed"
        assert statuses[f"{kernel}: matches its lock"] == "passed"
    for service, (health, port) in CLIENT_SERVICES.get(name, {}).items():
        for check in (
            f"answers {health} through nginx over TLS",
            f"runs as its own user svc-{service}",
            f"port {port} reachable only through nginx",
            "secrets made on this machine's first boot",
            "restarts on failure",
        ):
            assert statuses[f"{service}: {check}"] == "passed", details[f"{service}: {check}"]
    assert [n for n, s in statuses.items() if s == "failed"] == []
    # Booted at the profile's level (the default, x86-64-v2), and the report says with what.
    assert report["subject"]["cpu"]["model"] == "Nehalem"
    assert statuses["cpu: the VM runs at x86-64-v2 (QEMU model Nehalem)"] == "passed"
    assert "Nehalem" in (delivery / "report.html").read_text()


def test_client_delivery_keeps_the_profiles_hardware(client_delivery):
    """The build VM was cut to fit this host; the delivered OVF still asks for the profile's."""
    name, delivery, _ = client_delivery
    profile = json.loads(
        subprocess.run(
            [sys.executable, "-c", _PROFILE_RESOURCES, str(delivery / "profile.yaml")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    ovf = subprocess.run(
        ["tar", "-xOf", str(delivery / f"{name}.ova"), f"{name}.ovf"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"<rasd:VirtualQuantity>{profile['cpus']}</rasd:VirtualQuantity>" in ovf
    assert f"<rasd:VirtualQuantity>{profile['memory']}</rasd:VirtualQuantity>" in ovf


_PROFILE_RESOURCES = """
import json, sys
from factory.profile import load_profile
print(json.dumps(load_profile(sys.argv[1]).profile.resources.model_dump()))
"""


@pytest.mark.hospital_build
def test_hospital_profile_builds_and_validates(tmp_path, demo_channel):
    """The hospital profile as written (GPU driver by DKMS in its base layer, PyTorch with
    CUDA 12.1): every check passes but GPU level 2, which is skipped without a GPU; the
    notebook trains its CNN on the CPU. `make test-hospital`."""
    require_root()
    profile = REPO / "profiles" / "hospital_lung_nodule_v1.yaml"
    build = run_factory("build", str(profile), "--outputs", str(tmp_path), timeout=10800)
    print(build.stderr[-6000:], file=sys.stderr)
    assert build.returncode == 0, build.stderr[-4000:]
    delivery = tmp_path / "hospital_lung_nodule_v1"
    validation = run_factory("validate", str(delivery), timeout=7200)
    print(validation.stdout, validation.stderr[-3000:], file=sys.stderr)
    assert validation.returncode == 0, validation.stdout[-6000:]
    checks = {c["name"]: c for c in json.loads((delivery / "report.json").read_text())["checks"]}
    for name in (
        "gpu: driver 535 is installed",
        "gpu: kernel module built for the booted kernel",
        "notebooks: healthcare-lung-nodule.ipynb runs headless",
        "lung-nodule: imports torch",
    ):
        assert checks[name]["status"] == "passed", checks[name]
    skipped = [name for name, c in checks.items() if c["status"] == "skipped"]
    assert skipped and all(name.startswith("gpu:") for name in skipped), skipped
