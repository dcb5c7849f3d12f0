"""Files a profile names (extends, notebooks, environment_file, jupyter.tls, local channels)
lie, after symlinks, under the profile's folder, the presets, the example profiles or
$FACTORY_ALLOWED_ROOTS (local channels also under the cache's channels); special and oversize
files are refused, and the client's TLS files must be a usable PEM pair. Each refusal is one
line naming the file, line and field."""

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factory.errors import ProfileError
from factory.profile import ALLOWED_ROOTS_ENV_VAR, load_profile
from tests.conftest import DEMO_PROFILE, REPO, run_factory
from tests.test_profile import GOOD

NOTEBOOK = '{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}\n'


@pytest.fixture
def folders(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A profile folder and a folder beside it that the profile may not read; a private
    cache so that its channels folder is known."""
    monkeypatch.delenv(ALLOWED_ROOTS_ENV_VAR, raising=False)
    monkeypatch.setenv("FACTORY_CACHE_DIR", str(tmp_path / "cache"))
    inside, outside = tmp_path / "client", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    return inside, outside


def write(folder: Path, extra: str, base: str = GOOD) -> Path:
    path = folder / "p.yaml"
    path.write_text(base + extra)
    return path


def refused(path: Path, expected: str) -> str:
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    message = str(error.value)
    assert expected in message, message
    assert message.startswith(f"{path}:"), message
    assert "\n" not in message
    return message


def test_each_kind_of_path_is_confined(folders):
    inside, outside = folders
    (outside / "n.ipynb").write_text(NOTEBOOK)
    (outside / "environment.yml").write_text("dependencies: [python=3.11]\n")
    (outside / "base.yaml").write_text("industry: stolen\n")
    (outside / "channel").mkdir()
    cases = {
        "notebooks: [../elsewhere/n.ipynb]\n": "p.yaml:12: notebooks[0]: ../elsewhere/n.ipynb",
        "extends: ../elsewhere/base.yaml\n": "p.yaml:12: extends: ../elsewhere/base.yaml",
        f"jupyter: {{tls: {{certificate: {outside}/n.ipynb, key: k}}}}\n": (
            "p.yaml:12: jupyter.tls.certificate:"
        ),
    }
    for extra, where in cases.items():
        message = refused(write(inside, extra), where)
        assert f"is outside this profile's folder {inside}" in message
        assert ALLOWED_ROOTS_ENV_VAR in message
    env_file = GOOD.replace("    channels: [conda-forge]\n    conda: [numpy]\n", "")
    env_file = env_file.replace(
        "  - name: model\n", "  - environment_file: ../elsewhere/environment.yml\n"
    )
    refused(write(inside, "", env_file), "p.yaml:8: environments[0].environment_file: ../elsewhere")
    for channel in ("../elsewhere/channel", (outside / "channel").as_uri()):
        text = GOOD.replace("channels: [conda-forge]", f"channels: ['{channel}']")
        refused(write(inside, "", text), "p.yaml:10: environments[0].channels[0]: ")


def test_a_symlink_that_leaves_the_folder_is_followed_and_refused(folders):
    inside, outside = folders
    (outside / "n.ipynb").write_text(NOTEBOOK)
    (inside / "n.ipynb").symlink_to(outside / "n.ipynb")
    message = refused(write(inside, "notebooks: [n.ipynb]\n"), "notebooks[0]: n.ipynb (that is ")
    assert str(outside / "n.ipynb") in message


def test_allowed_roots_let_a_named_folder_in(folders, monkeypatch):
    inside, outside = folders
    (outside / "n.ipynb").write_text(NOTEBOOK)
    path = write(inside, "notebooks: [../elsewhere/n.ipynb]\n")
    refused(path, "is outside this profile's folder")
    monkeypatch.setenv(ALLOWED_ROOTS_ENV_VAR, os.pathsep.join(["/nonexistent", str(outside)]))
    assert load_profile(path).profile.notebooks == [str(outside / "n.ipynb")]


def test_local_channels_may_live_in_the_cache_and_resolve_from_the_file_naming_them(folders):
    """The demo's channel is a symlink into the cache's channels folder; a parent profile's
    relative channel is read from the parent's folder, not the child's."""
    inside, _ = folders
    cached = inside.parent / "cache" / "channels" / "test-1"
    cached.mkdir(parents=True)
    (inside / "shared").mkdir()
    (inside / "shared" / "demo").symlink_to(cached)
    parent = inside / "shared" / "parent.yaml"
    parent.write_text(GOOD.replace("channels: [conda-forge]", "channels: [./demo]"))
    child = write(inside, "", "extends: shared/parent.yaml\n")
    loaded = load_profile(child)
    assert loaded.profile.environments[0].channels == [cached.as_uri()]
    assert loaded.resolve_channel(loaded.profile.environments[0].channels[0]) == cached.as_uri()


def test_a_missing_local_channel_is_left_to_the_solver(folders):
    """A delivered profile names the build host's channel, which another host lacks: loading
    it (to validate the delivery) does not need the folder."""
    inside, _ = folders
    text = GOOD.replace("channels: [conda-forge]", "channels: [./not-built-yet]")
    channels = load_profile(write(inside, "", text)).profile.environments[0].channels
    assert channels == [(inside / "not-built-yet").as_uri()]


def test_the_example_profiles_and_presets_may_be_extended_from_anywhere(folders, monkeypatch):
    """As the render tests do; the demo's channel is a link into the real cache (or not made
    yet, on a fresh checkout)."""
    inside, _ = folders
    demo_channel = REPO / "outputs" / "channels" / "demo"
    if demo_channel.is_symlink():  # into whichever cache `make channel` used
        monkeypatch.setenv("FACTORY_CACHE_DIR", str(demo_channel.resolve().parent.parent))
    else:
        monkeypatch.delenv("FACTORY_CACHE_DIR")
    path = inside / "p.yaml"
    path.write_text(f"extends: {DEMO_PROFILE}\nclient: other\n")
    loaded = load_profile(path)
    assert loaded.profile.notebooks == [str(REPO / "profiles/notebooks/demo-credit-score.ipynb")]


@pytest.mark.parametrize("target", ["/proc/self/environ", "/dev/null", "/sys/kernel/uevent_seqnum"])
def test_special_files_are_refused(folders, target):
    inside, _ = folders
    extra = f"jupyter: {{tls: {{certificate: {target}, key: {target}}}}}\n"
    refused(write(inside, extra), "is a special file (under /")


def test_a_fifo_is_refused_without_blocking(folders, monkeypatch):
    inside, _ = folders
    os.mkfifo(inside / "client.crt")
    extra = "jupyter: {tls: {certificate: client.crt, key: client.crt}}\n"
    refused(write(inside, extra), "jupyter.tls.certificate: ")
    monkeypatch.setenv(ALLOWED_ROOTS_ENV_VAR, "/")
    refused(write(inside, "notebooks: [/dev/stdin]\n"), "is a special file (under /dev)")


def test_oversize_files_are_refused(folders):
    inside, _ = folders
    (inside / "big.yaml").write_text("industry: big\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(ProfileError, match=r"/big.yaml: big.yaml is larger than 1 MiB"):
        load_profile(write(inside, "extends: big.yaml\n"))
    path = write(inside, "#" * (1 << 20) + "\n")
    with pytest.raises(ProfileError, match=r"p.yaml: p.yaml is larger than 1 MiB"):
        load_profile(path)


# --- the client's TLS files -------------------------------------------------------------


def certificate(key: ec.EllipticCurvePrivateKey, days: int, issuer_key=None) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jupyter.client.example")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=400))
        .not_valid_after(now + timedelta(days=days))
        .sign(issuer_key or key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def tls_profile(folder: Path, cert: bytes, key: bytes) -> Path:
    (folder / "client.crt").write_bytes(cert)
    (folder / "client.key").write_bytes(key)
    return write(folder, "jupyter: {tls: {certificate: client.crt, key: client.key}}\n")


def test_a_matching_pem_chain_and_key_load(folders):
    inside, _ = folders
    leaf, ca = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    chain = certificate(leaf, 30, issuer_key=ca) + certificate(ca, 3650)
    tls = load_profile(tls_profile(inside, chain, key_pem(leaf))).profile.jupyter.tls
    assert tls is not None and tls.key == str(inside / "client.key")


def test_tls_problems_are_one_line_naming_the_field(folders):
    inside, _ = folders
    leaf, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    good = certificate(leaf, 30)
    cases = [
        (certificate(leaf, -1), key_pem(leaf), "jupyter.tls.certificate: client.crt expired on"),
        (good + key_pem(leaf), key_pem(leaf), "client.crt also holds a private key"),
        (b"not a certificate\n", key_pem(leaf), "is not a PEM certificate chain"),
        (good, key_pem(leaf, b"secret"), "jupyter.tls.key: client.key is encrypted"),
        (good, good, "jupyter.tls.key: client.key is not a PEM private key"),
        (good, key_pem(other), "client.key is not the key of client.crt's first certificate"),
    ]
    for cert, key, expected in cases:
        refused(tls_profile(inside, cert, key), expected)


# --- notebooks and strict YAML -------------------------------------------------------


@pytest.mark.parametrize(
    "content,expected",
    [
        ("{not json", "n.ipynb is not a notebook (not JSON: "),
        ("[]", "n.ipynb is not a notebook (JSON, but not an object"),
        ('{"metadata": 5}', "n.ipynb is not a notebook (JSON, but not an object"),
        (b"\xff\xfe{}", "n.ipynb is not a notebook (not JSON: "),
    ],
)
def test_a_notebook_that_is_not_one_is_refused_at_load(folders, content, expected):
    inside, _ = folders
    notebook = inside / "n.ipynb"
    notebook.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(write(inside, "notebooks: [n.ipynb]\n"), f"p.yaml:12: notebooks[0]: {expected}")


def test_a_duplicate_key_deep_in_the_profile_names_both_lines(folders):
    inside, _ = folders
    text = GOOD.replace('    python: "3.11"\n', '    python: "3.11"\n    python: "3.12"\n')
    refused(
        write(inside, "", text),
        "p.yaml:10: environments[0].python: duplicate key (first at line 9); remove one",
    )


def test_version_must_be_a_real_integer(folders):
    inside, _ = folders
    for value in ("true", "'2'", "2.0"):
        text = GOOD.replace("version: 2", f"version: {value}")
        refused(write(inside, "", text), "p.yaml:3: version: Input should be a valid integer")


def test_the_cli_allow_root_option_lets_a_folder_in(folders, tmp_path):
    inside, outside = folders
    (outside / "n.ipynb").write_text(NOTEBOOK)
    path = write(inside, "notebooks: [../elsewhere/n.ipynb]\n")
    refused_run = run_factory("credentials", str(path))
    assert refused_run.returncode == 2 and "--allow-root" in refused_run.stderr
    allowed = run_factory("--allow-root", str(outside), "credentials", str(path))
    assert allowed.returncode == 0, allowed.stderr
