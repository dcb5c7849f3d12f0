"""Render: the real templates, parsed back with python-hcl2, checked by `packer validate`
and shellcheck; profile strings survive each target language unchanged."""

import json
import os
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import hcl2
import pytest
import yaml
from hcl2 import SerializationOptions
from hypothesis import given, settings
from hypothesis import strategies as st

from factory.chain import system_inputs
from factory.escape import cloud_config, hcl_string, shell_assignments
from factory.keys import ephemeral_keypair
from factory.profile import load_profile
from factory.render import BuildInputs, render_build_dir
from factory.resources import PROVISIONERS_DIR
from tests.conftest import DEMO_PROFILE, REPO, run_factory

HCL_OPTIONS = SerializationOptions(strip_string_quotes=True)


def parse_hcl(text: str) -> dict:
    return hcl2.loads(text, serialization_options=HCL_OPTIONS)


def render_demo(tmp_path: Path, profile: Path = DEMO_PROFILE, packer_version=(1, 6, 6)) -> Path:
    loaded = load_profile(profile)
    with ephemeral_keypair("test") as key:
        inputs = BuildInputs(
            base_image=str(tmp_path / "base.qcow2"),
            base_image_checksum="none",
            accelerator="tcg",
            output_directory=str(tmp_path / "out"),
            console_log=str(tmp_path / "console.log"),
            build_key=key,
            packer_version=packer_version,
        )
        return render_build_dir(loaded, inputs, tmp_path / "build")


def test_profiles_that_differ_only_in_policy_share_one_system_layer(tmp_path):
    """Log retention and automatic updates are set in the client layer: the demo, the bank and
    the maintenance profile (another preset: 180 days, updates on) key one system layer; the
    hospital's GPU driver makes its own."""
    names = ["demo", "bank_credit_risk_v2", "factory_predictive_maintenance_v1"]
    keyed = {}
    for name in [*names, "hospital_lung_nodule_v1"]:
        path = REPO / "profiles" / f"{name}.yaml"
        keyed[name] = system_inputs(load_profile(path), render_demo(tmp_path, path), 4)
    assert [keyed[name] for name in names] == [keyed["demo"]] * 3
    assert "AUDIT_RETENTION_DAYS" not in keyed["demo"]["settings"]
    assert keyed["hospital_lung_nodule_v1"] != keyed["demo"]


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed")
def test_demo_renders_and_packer_validates(tmp_path):
    build = render_demo(tmp_path)
    template = parse_hcl((build / "image.pkr.hcl").read_text())
    source = template["source"][0]["qemu"]["image"]
    assert source["accelerator"] == "${var.accelerator}"
    assert source["cd_label"] == "cidata"
    scripts = [
        p["shell"]["script"]
        for p in template["build"][0]["provisioner"]
        if "script" in p.get("shell", {})
    ]
    # The build VM runs the system stages only; the rest run on the host, one layer each.
    assert scripts == [
        "provisioners/10-system.sh",
        "provisioners/12-security.sh",
        "provisioners/14-monitoring.sh",
        "provisioners/30-jupyter.sh",
    ]
    uploads = [p["file"]["source"] for p in template["build"][0]["provisioner"] if "file" in p]
    assert "payload/settings.sh" in uploads and "payload/seal.sh" in uploads
    assert not any("channel" in u or "notebooks" in u or "tls" in u for u in uploads)
    host_scripts = sorted(p.name for p in (build / "provisioners").glob("*.sh"))
    assert {"20-conda-envs.sh", "40-jupyter-client.sh", "50-client-files.sh"} <= set(host_scripts)
    variables = parse_hcl((build / "image.pkrvars.hcl").read_text())
    assert variables["vm_name"] == "demo_hello_v1.qcow2"
    assert variables["disk_size"] == "8G"
    assert "required_plugins" not in (build / "image.pkr.hcl").read_text()
    seed = yaml.safe_load((build / "seed" / "user-data").read_text())
    assert seed["users"][0]["name"] == "factory-build"
    assert "PRIVATE" not in "".join(p.read_text() for p in build.rglob("*") if p.is_file())


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed")
def test_every_provisioners_file_a_stage_installs_is_in_the_payload(tmp_path):
    """A stage script that installs provisioners/<file> from $FACTORY_PAYLOAD finds it there."""
    build = render_demo(tmp_path)
    wanted = set()
    for script in (build / "provisioners").glob("*.sh"):
        for name in re.findall(r"\$FACTORY_PAYLOAD/([\w.-]+)", script.read_text()):
            if (PROVISIONERS_DIR / name).is_file():
                wanted.add(name)
    assert "factory-firstboot" in wanted
    assert sorted(n for n in wanted if not (build / "payload" / n).is_file()) == []


def test_modern_packer_gets_required_plugins(tmp_path):
    loaded = load_profile(DEMO_PROFILE)
    from factory.render import render_packer_template

    with ephemeral_keypair("t") as key:
        inputs = BuildInputs("b", "none", "tcg", "o", "c", key, packer_version=(1, 11, 2))
        text = render_packer_template(loaded, inputs, tmp_path)
    assert "required_plugins" in text
    assert parse_hcl(text)["packer"][0]["required_plugins"]


def test_cli_render_writes_outside_the_delivery_and_replaces_its_target(tmp_path):
    """`factory render` writes outputs/renders/<name>/, never outputs/<name>/ (the delivery);
    a second render replaces the first whole, and no scratch folder is left behind."""
    result = run_factory("render", str(DEMO_PROFILE), "--outputs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    target = tmp_path / "renders" / "demo_hello_v1"
    assert (target / "image.pkr.hcl").is_file()
    assert not (tmp_path / "demo_hello_v1").exists()
    (target / "stale.txt").write_text("from an older render")
    result = run_factory("render", str(DEMO_PROFILE), "--outputs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (target / "image.pkr.hcl").is_file() and not (target / "stale.txt").exists()
    leftovers = [p.name for p in (tmp_path / "renders").iterdir()]
    assert leftovers == ["demo_hello_v1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo_hello_v1.lock", "renders"]


def test_cli_render_into_a_folder_and_never_into_a_delivery(tmp_path):
    into = tmp_path / "review"
    result = run_factory(
        "render", str(DEMO_PROFILE), "--outputs", str(tmp_path / "out"), "--into", str(into)
    )
    assert result.returncode == 0, result.stderr
    assert (into / "image.pkr.hcl").is_file()
    assert not (tmp_path / "out" / "renders").exists()
    delivery = tmp_path / "out" / "demo_hello_v1"
    delivery.mkdir()
    for bad, message in (
        (delivery / "build", "is inside the delivery folder"),
        (tmp_path, "holds something other than a factory render"),
    ):
        result = run_factory(
            "render", str(DEMO_PROFILE), "--outputs", str(tmp_path / "out"), "--into", str(bad)
        )
        assert result.returncode == 1
        assert result.stderr.startswith("error: --into ") and message in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert list(delivery.iterdir()) == []


def test_cli_render_refuses_while_a_build_of_the_profile_holds_the_lock(tmp_path):
    from factory.delivery import build_lock

    with build_lock(tmp_path, "demo_hello_v1"):
        result = run_factory("render", str(DEMO_PROFILE), "--outputs", str(tmp_path))
    assert result.returncode == 1
    assert "another build of demo_hello_v1 is running" in result.stderr
    assert not (tmp_path / "renders" / "demo_hello_v1").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_provisioners_pass_shellcheck():
    scripts = sorted(PROVISIONERS_DIR.glob("*.sh")) + [
        PROVISIONERS_DIR / name for name in ("factory-firstboot", "factory-rotate-token")
    ]
    result = subprocess.run(
        ["shellcheck", "-x", *map(str, scripts)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


NASTY = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40
) | st.sampled_from(
    ['"\n', "${var.x}", "%{ if true }", "${", "%{", "$${", "$(reboot)", "`id`", "\\", "'\"'"]
)


@settings(max_examples=300, deadline=None)
@given(NASTY)
def test_hcl_string_round_trips(value):
    parsed = parse_hcl(f"x = {hcl_string(value)}\n")
    assert parsed["x"] == value


@settings(max_examples=25, deadline=None)
@given(st.lists(NASTY, min_size=1, max_size=12))
def test_packer_reads_hcl_strings_back_literally(tmp_path_factory, values):
    """Packer itself (`packer console`) evaluates each rendered string to the profile's text,
    NFC-normalised as HCL does: no interpolation, no directive, no escape left over."""
    folder = tmp_path_factory.mktemp("hcl")
    names = [f"v{i}" for i in range(len(values))]
    lines = [f"  {n} = {hcl_string(v)}" for n, v in zip(names, values, strict=True)]
    (folder / "strings.pkr.hcl").write_text("locals {\n" + "\n".join(lines) + "\n}\n")
    expression = "jsonencode([" + ", ".join(f"local.{n}" for n in names) + "])\n"
    result = subprocess.run(
        ["packer", "console", "strings.pkr.hcl"],
        input=expression,
        capture_output=True,
        text=True,
        cwd=folder,
        env={**os.environ, "CHECKPOINT_DISABLE": "1"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [unicodedata.normalize("NFC", v) for v in values]


@settings(max_examples=300, deadline=None)
@given(NASTY)
def test_shell_word_round_trips(value):
    script = shell_assignments({"VALUE": value}) + 'printf %s "$VALUE"\n'
    result = subprocess.run(["bash", "-c", script], capture_output=True)
    assert result.returncode == 0
    assert result.stdout.decode("utf-8", "surrogateescape") == value


@settings(max_examples=300, deadline=None)
@given(NASTY)
def test_cloud_config_round_trips(value):
    text = cloud_config({"value": value})
    assert text.startswith("#cloud-config\n")
    assert yaml.safe_load(text)["value"] == value


INDUSTRY_PROFILES = {
    "bank_credit_risk_v2": {
        "OFFLINE": "1",
        "OPEN_PORTS": "'22 80 443 9100'",
        "UNATTENDED_UPGRADES": "0",
        "AUDIT_RETENTION_DAYS": "2555",
    },
    "hospital_lung_nodule_v1": {
        "OFFLINE": "1",
        "OPEN_PORTS": "'22 80 443'",
        "UNATTENDED_UPGRADES": "0",
        "AUDIT_RETENTION_DAYS": "3650",
    },
    "factory_predictive_maintenance_v1": {
        "OFFLINE": "0",
        "OPEN_PORTS": "'22 80 443 9100'",
        "UNATTENDED_UPGRADES": "1",
        "AUDIT_RETENTION_DAYS": "180",
    },
}


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed")
@pytest.mark.parametrize("name", sorted(INDUSTRY_PROFILES))
def test_industry_profile_renders_and_packer_validates(name, tmp_path):
    """`factory render` (python-hcl2 parse-back and `packer validate`) on each example."""
    result = run_factory("render", f"profiles/{name}.yaml", "--outputs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    build = tmp_path / "renders" / name
    settings = dict(
        line.split("=", 1)
        for line in (build / "payload" / "settings.sh").read_text().splitlines()
        if "=" in line
    )
    for key, value in INDUSTRY_PROFILES[name].items():
        assert settings[key] == value, key
    profile = load_profile(REPO / "profiles" / f"{name}.yaml").profile
    notebooks = {p.name: p for p in (build / "payload" / "notebooks").glob("*.ipynb")}
    assert sorted(notebooks) == sorted(Path(n).name for n in profile.notebooks)
    envs = [env.name for env in profile.environments]
    for source in map(Path, profile.notebooks):
        # Each sample opens on the environment its own kernelspec names, else the first.
        own = json.loads(source.read_text()).get("metadata", {}).get("kernelspec", {})
        wanted = own.get("name") if own.get("name") in envs else envs[0]
        kernel = json.loads(notebooks[source.name].read_text())["metadata"]["kernelspec"]
        assert kernel["name"] == wanted


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed")
@pytest.mark.parametrize(
    "name, extra, restrict",
    [
        ("bank_credit_risk_v2", "", True),
        ("factory_predictive_maintenance_v1", "", True),
        ("factory_predictive_maintenance_v1", "monitoring: {prometheus: true}\n", False),
    ],
)
def test_build_vm_is_bounded_in_time_and_reachable_only_from_loopback(
    name, extra, restrict, tmp_path
):
    """Every shell provisioner stops after var.provisioner_timeout (90m unless overridden);
    the build VM's SSH forward binds 127.0.0.1, and the VM is cut off (restrict=on: neither
    the internet nor the host's loopback) unless a stage downloads inside it, here the
    Prometheus server of an online profile. The render's own `packer validate` accepts all."""
    profile = REPO / "profiles" / f"{name}.yaml"
    if extra:
        profile = tmp_path / "profile.yaml"
        profile.write_text(f"extends: {REPO / 'profiles' / name}.yaml\n{extra}")
    result = run_factory("render", str(profile), "--outputs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    template = parse_hcl((tmp_path / "renders" / name / "image.pkr.hcl").read_text())
    variables = {k: v for block in template["variable"] for k, v in block.items()}
    assert variables["provisioner_timeout"]["default"] == "90m"
    shells = [p["shell"] for p in template["build"][0]["provisioner"] if "shell" in p]
    assert shells and all(s["timeout"] == "${var.provisioner_timeout}" for s in shells)
    qemuargs = dict(template["source"][0]["qemu"]["image"]["qemuargs"])
    options = qemuargs["-netdev"].split(",")
    assert options[:2] == ["user", "id=user.0"]
    assert "hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22" in options
    assert ("restrict=on" in options) is restrict
    assert qemuargs["-device"] == "virtio-net,netdev=user.0"


def test_industry_profiles_share_presets_not_copies():
    """The examples inherit security, monitoring and offline mode from presets, and the
    presets' notebooks are named where they are, never copied."""
    presets = REPO / "factory" / "profile" / "presets" / "notebooks"
    preset_notebooks = {p.read_bytes() for p in presets.glob("*.ipynb")}
    for name in INDUSTRY_PROFILES:
        text = (REPO / "profiles" / f"{name}.yaml").read_text()
        assert text.count("extends:") == 1
        for key in ("security:", "monitoring:", "offline:"):
            assert key not in text, (name, key)
        for notebook in load_profile(REPO / "profiles" / f"{name}.yaml").profile.notebooks:
            path = Path(notebook)
            assert path.parent == presets or path.read_bytes() not in preset_notebooks, path


def test_prometheus_config_scrapes_node_and_jupyter(tmp_path):
    from factory.render import prometheus_config

    loaded = load_profile(REPO / "profiles" / "factory_predictive_maintenance_v1.yaml")
    config = yaml.safe_load(prometheus_config(loaded))
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert targets == {"node": ["127.0.0.1:9100"], "jupyter": ["127.0.0.1:8888"]}


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed")
@pytest.mark.parametrize("base", ["debian-12", "ubuntu"])
def test_gpu_profiles_render_with_the_driver_stage(base, tmp_path):
    """The GPU stage is rendered for Debian (driver in the base layer, checked per kernel)
    and for an Ubuntu cloud image (precompiled modules or DKMS), and packer validates both."""
    from factory.pipeline import gpu_base_packages

    path = tmp_path / "gpu.yaml"
    text = f"extends: {REPO / 'profiles' / 'demo-gpu.yaml'}\n"
    if base == "ubuntu":
        text += (
            "base: {url: 'https://cloud-images.ubuntu.com/jammy/current/"
            "jammy-server-cloudimg-amd64.img', sha256: '" + "c" * 64 + "', os: ubuntu}\n"
            "gpu: {driver: '550', cuda: '12.4'}\n"
        )
    path.write_text(text)
    result = run_factory("render", str(path), "--outputs", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    build = tmp_path / "out" / "renders" / "demo_hello_gpu_v1"
    assert (build / "provisioners" / "15-gpu.sh").is_file()
    settings = (build / "payload" / "settings.sh").read_text()
    loaded = load_profile(path)
    assert f"GPU_DRIVER={loaded.profile.gpu.driver}" in settings
    assert loaded.profile.target_virtual_packages()["__cuda"] == loaded.profile.gpu.cuda
    expected = ("linux-headers-amd64", "nvidia-kernel-dkms", "nvidia-smi")
    assert gpu_base_packages(loaded) == (expected if base == "debian-12" else ())


def client_tls_profile(tmp_path: Path) -> Path:
    """The demo profile with a client-supplied certificate and key (client.crt, client.key)."""
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=jupyter.client.example",
            "-keyout",
            str(tmp_path / "client.key"),
            "-out",
            str(tmp_path / "client.crt"),
        ],
        check=True,
        capture_output=True,
    )
    path = tmp_path / "tls.yaml"
    path.write_text(
        f"extends: {DEMO_PROFILE}\njupyter: {{tls: {{certificate: client.crt, key: client.key}}}}\n"
    )
    return path


def test_client_certificate_ships_in_the_payload_but_never_in_the_delivery(tmp_path):
    """A profile may supply the client's own certificate: it goes into the payload (key mode
    0600), the delivered profile does not name it, and the delivery's copy of the build folder
    leaves the tls folder out."""
    from factory.delivery import UNDELIVERED_PAYLOAD_DIRS, Delivery, write_delivered_profile

    path = client_tls_profile(tmp_path)
    build = render_demo(tmp_path, path)
    key = build / "payload" / "tls" / "jupyter.key"
    assert key.read_bytes() == (tmp_path / "client.key").read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600
    assert "tls" in UNDELIVERED_PAYLOAD_DIRS
    loaded = load_profile(path)
    delivery = Delivery.of(tmp_path, loaded)
    delivery.path.mkdir()
    written = write_delivered_profile(loaded, delivery)
    assert "client.key" not in written.read_text()
    assert (delivery.path / "notebooks" / "demo-credit-score.ipynb").is_file()
    assert load_profile(written).profile.jupyter.tls is None


def test_cli_render_leaves_the_client_tls_key_out(tmp_path):
    """The client's private key never lands in outputs/, not even from `factory render`."""
    path = client_tls_profile(tmp_path)
    outputs = tmp_path / "outputs"
    result = run_factory("render", str(path), "--outputs", str(outputs))
    assert result.returncode == 0, result.stderr
    assert (outputs / "renders" / "demo_hello_v1" / "payload" / "settings.sh").is_file()
    secret = (tmp_path / "client.key").read_bytes()
    files = [p for p in outputs.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name == "jupyter.key" or secret in p.read_bytes()]


def test_credentials_tell_it_how_to_read_first_boot_secrets():
    result = run_factory("credentials", "profiles/bank_credit_risk_v2.yaml")
    assert result.returncode == 0, result.stderr
    assert "ssh riskadmin@HOST cat jupyter-token" in result.stdout
    assert "open inbound TCP ports: 22, 80, 443, 9100." in result.stdout
    assert "Audit trail (2555 days)" in result.stdout
    bad = run_factory("credentials", "profiles/missing.yaml")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


def test_a_service_renders_as_a_unit_behind_nginx_with_no_secret_in_it(tmp_path):
    """The demo's `score` service: a unit running the environment's own python as svc-score
    from its folder, an nginx location to its loopback port, and only the names of its
    secrets (the values are made on the machine)."""
    result = run_factory("render", "profiles/demo.yaml", "--outputs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    service = tmp_path / "renders" / "demo_hello_v1" / "payload" / "services" / "score"
    unit = (service / "factory-service-score.service").read_text()
    assert 'ExecStart="/opt/conda/envs/demo/bin/python" "credit_score_api.py"' in unit
    assert "User=svc-score" in unit and "WorkingDirectory=/srv/services/score" in unit
    assert 'Environment="PORT=8601"' in unit and "Restart=on-failure" in unit
    assert "EnvironmentFile=-/etc/factory/services/score.env" in unit
    assert "API_KEY" not in unit
    assert (service / "secrets").read_text() == "API_KEY\n"
    nginx = (service / "nginx.conf").read_text()
    assert "location /score/ {" in nginx and "proxy_pass http://127.0.0.1:8601/;" in nginx
    assert sorted(p.name for p in (service / "files").iterdir()) == [
        "credit_model.json",
        "credit_score_api.py",
    ]
    snapshots = tmp_path / "renders" / "demo_hello_v1" / "payload" / "snapshots"
    assert "OnCalendar=daily" in (snapshots / "factory-snapshot.timer").read_text()
    assert "factory-env snapshot --keep 14" in (snapshots / "factory-snapshot.service").read_text()


def test_a_service_command_word_is_taken_literally():
    from factory.escape import systemd_word

    assert systemd_word('a "b" $HOME 100%') == '"a \\"b\\" $$HOME 100%%"'
