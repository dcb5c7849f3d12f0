"""Profile loading: the demo is valid, and bad input gets one line naming file, line and field."""

from pathlib import Path

import pytest

from factory.errors import ProfileError
from factory.profile import load_profile
from tests.conftest import DEMO_PROFILE, run_factory

KEY = DEMO_PROFILE.read_text().split("- ssh-ed25519 ", 1)[1].split("\n", 1)[0]
GOOD = f"""\
client: acme
project: fraud
version: 2
admin:
  user: analyst
  ssh_keys: ["ssh-ed25519 {KEY}"]
environments:
  - name: model
    python: "3.11"
    channels: [conda-forge]
    conda: [numpy]
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_demo_profile_loads():
    loaded = load_profile(DEMO_PROFILE)
    assert loaded.name == "demo_hello_v1"
    assert loaded.profile.environments[0].python == "3.11"
    assert len(loaded.sha256) == 64


def test_name_is_client_project_version(tmp_path):
    loaded = load_profile(write(tmp_path, GOOD))
    assert loaded.name == "acme_fraud_v2"
    assert loaded.resolve_channel("conda-forge") == "https://conda.anaconda.org/conda-forge"


def test_windows_line_endings_and_bom_are_accepted(tmp_path):
    path = tmp_path / "crlf.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode())
    assert load_profile(path).name == "acme_fraud_v2"


BAD = [
    ("client: Acme", "client", "p.yaml:1: client: must start with a letter"),
    ("version: 0", "version", "p.yaml:3: version: Input should be greater than or equal to 1"),
    ("environmnts: []", None, "unknown key (did you mean 'environments'?)"),
    ("  - name: base", "env-base", "environments[0].name: must be letters"),
    ('    python: "three"', "python", "environments[0].python: must look like '3.11'"),
    ('  ssh_keys: ["ssh-ed25519 !!!"]', "key", "admin.ssh_keys: key 1 is not an OpenSSH"),
    ("base: {url: 'ftp://x/y.qcow2', sha256: abc}", None, "base.url: must be an http://"),
    ("resources: {cpus: many}", None, "resources.cpus: Input should be a valid integer"),
    ("jupyter: {port: 80}", None, "jupyter.port: Input should be greater than or equal to 1024"),
]


@pytest.mark.parametrize("line,replace,expected", BAD)
def test_bad_profiles_name_the_field(tmp_path, line, replace, expected):
    text = GOOD
    replaced = {
        "client": ("client: acme", line),
        "version": ("version: 2", line),
        "env-base": ("  - name: model", line),
        "python": ('    python: "3.11"', line),
        "key": (f'  ssh_keys: ["ssh-ed25519 {KEY}"]', line),
    }
    if replace:
        old, new = replaced[replace]
        text = text.replace(old, new)
    else:
        text = text + line + "\n"
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith(str(path))


def test_not_yaml_and_empty(tmp_path):
    with pytest.raises(ProfileError, match=r"p.yaml:3: not valid YAML"):
        load_profile(write(tmp_path, "client: [\nproject: x\n"))
    with pytest.raises(ProfileError, match="profile is empty"):
        load_profile(write(tmp_path, "# nothing\n"))


def test_duplicate_environment_names(tmp_path):
    text = GOOD + "  - name: model\n    python: '3.11'\n    channels: [x]\n"
    with pytest.raises(ProfileError, match="duplicate name 'model'"):
        load_profile(write(tmp_path, text))


def test_cli_bad_profile_is_one_line_without_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace("client: acme", "client: 'ac me'"))
    result = run_factory("render", str(path), "--outputs", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "client: must start with a letter" in result.stderr
    assert not (tmp_path / "out" / "acme_fraud_v2").exists()
