"""The image's first-boot secrets and token rotation, run for real against a throwaway root
(FACTORY_ROOT): real ssh-keygen, openssl and the cryptography parser. Only systemctl, which
needs a booted system, is a script that records its calls."""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from factory import image_layout
from factory.escape import shell_assignments
from factory.resources import PROVISIONERS_DIR

ADMIN = getpass.getuser()


@pytest.fixture
def image_root(tmp_path) -> Path:
    """/etc/factory/settings.sh and the folders first boot writes into, under tmp_path."""
    root = tmp_path / "root"
    (root / "etc/factory").mkdir(parents=True)
    (root / "etc/ssh").mkdir()
    (root / "etc/factory/settings.sh").write_text(
        shell_assignments(
            {
                "FACTORY_NAME": "acme_demo_v1",
                "ADMIN_USER": ADMIN,
                "JUPYTER_ENABLED": 1,
                **image_layout.settings(),
            }
        )
    )
    home = Path(os.path.expanduser(f"~{ADMIN}"))
    (root / home.relative_to("/")).mkdir(parents=True)
    return root


def run_script(name: str, root: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FACTORY_ROOT": str(root)}
    if path:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        [str(PROVISIONERS_DIR / name)], env=env, capture_output=True, text=True, timeout=60
    )


def tokens(root: Path) -> tuple[str, str]:
    service = (root / "etc/factory/jupyter.env").read_text()
    admin = root / Path(os.path.expanduser(f"~{ADMIN}")).relative_to("/") / "jupyter-token"
    for path in (root / "etc/factory/jupyter.env", admin):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    return service.removeprefix("JUPYTER_TOKEN=").strip(), admin.read_text().strip()


def test_first_boot_certificate_is_a_tls_server_leaf_never_a_ca(image_root):
    result = run_script("factory-firstboot", image_root)
    assert result.returncode == 0, result.stderr
    certificate = x509.load_pem_x509_certificate(
        (image_root / "etc/factory/tls/jupyter.crt").read_bytes()
    )
    extensions = certificate.extensions
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    assert not usage.key_cert_sign and not usage.crl_sign
    purposes = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(purposes) == [ExtendedKeyUsageOID.SERVER_AUTH]
    names = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    host = socket.gethostname()
    assert {host, "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    key = image_root / "etc/factory/tls/jupyter.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    service, admin = tokens(image_root)
    assert re.fullmatch(r"[0-9a-f]{48}", service) and admin == service
    assert sorted(p.name for p in (image_root / "etc/ssh").glob("ssh_host_*_key"))


def test_rotate_token_makes_a_new_token_as_first_boot_does_and_restarts_jupyter(
    image_root, tmp_path
):
    assert run_script("factory-firstboot", image_root).returncode == 0
    before, _ = tokens(image_root)
    certificate = (image_root / "etc/factory/tls/jupyter.crt").read_bytes()
    host_key = next((image_root / "etc/ssh").glob("ssh_host_ed25519_key")).read_bytes()
    sbin = image_root / "usr/local/sbin"
    sbin.mkdir(parents=True)
    shutil.copy2(PROVISIONERS_DIR / "factory-firstboot", sbin / "factory-firstboot")
    runtime = image_root / "srv/jupyter/.local/share/jupyter/runtime"
    runtime.mkdir(parents=True)
    (runtime / "jupyter_cookie_secret").write_text("old sessions")
    fakes = tmp_path / "bin"
    fakes.mkdir()
    (fakes / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/systemctl.log\n')
    (fakes / "systemctl").chmod(0o755)
    result = run_script("factory-rotate-token", image_root, path=str(fakes))
    assert result.returncode == 0, result.stderr
    after, admin = tokens(image_root)
    assert re.fullmatch(r"[0-9a-f]{48}", after) and after != before and admin == after
    assert not (runtime / "jupyter_cookie_secret").exists()
    assert (tmp_path / "systemctl.log").read_text() == "restart jupyter.service\n"
    assert (image_root / "etc/factory/tls/jupyter.crt").read_bytes() == certificate
    assert (image_root / "etc/ssh/ssh_host_ed25519_key").read_bytes() == host_key
    assert before not in result.stdout + result.stderr
    assert after not in result.stdout + result.stderr


def test_thirty_jupyter_installs_rotate_token_for_root_only():
    script = (PROVISIONERS_DIR / "30-jupyter.sh").read_text()
    source, target = (
        '"$FACTORY_PAYLOAD/factory-rotate-token"',
        "/usr/local/sbin/factory-rotate-token",
    )
    assert f"install -m 700 {source} {target}" in script


def test_nginx_access_log_leaves_the_query_string_and_referer_out():
    """The token travels in ?token= links: the access log format has $uri, never $request,
    $request_uri, $args, $query_string or $http_referer, and the Jupyter site uses it."""
    script = (PROVISIONERS_DIR / "30-jupyter.sh").read_text()
    site = re.search(r"<<NGINX\n(.*?)\nNGINX\n", script, re.S).group(1)
    log_format = re.search(r"log_format factory_no_query (.*?);", site, re.S).group(1)
    assert "\\$uri" in log_format
    for leaky in ("request ", "request_uri", "args", "query_string", "http_referer"):
        assert f"\\${leaky}" not in log_format + " ", leaky
    assert re.findall(r"access_log (.*);", site) == [
        "/var/log/nginx/jupyter-access.log factory_no_query"
    ]


def test_sshd_drop_in_sorts_first_and_hardens_without_breaking_port_forwarding():
    """sshd keeps the first value it reads, so the drop-in sorts before cloud-init's
    50-cloud-init.conf; TCP forwarding stays (the validator reaches Jupyter through it)."""
    script = (PROVISIONERS_DIR / "10-system.sh").read_text()
    match = re.search(r"cat > /etc/ssh/sshd_config\.d/(\S+) <<'CONF'\n(.*?)\nCONF\n", script, re.S)
    name, body = match.groups()
    assert name == "00-factory.conf" and sorted([name, "50-cloud-init.conf"])[0] == name
    settings = dict(line.split(" ", 1) for line in body.splitlines() if not line.startswith("#"))
    assert settings == {
        "PermitRootLogin": "no",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "PermitEmptyPasswords": "no",
        "X11Forwarding": "no",
        "MaxAuthTries": "3",
        "LoginGraceTime": "30",
    }
    assert "rm -f /etc/ssh/sshd_config.d/50-factory.conf" in script


def test_first_boot_replaces_a_link_in_the_admins_home_instead_of_writing_through_it(
    image_root, tmp_path
):
    target = tmp_path / "elsewhere"
    target.write_text("untouched\n")
    home = image_root / Path(os.path.expanduser(f"~{ADMIN}")).relative_to("/")
    (home / "jupyter-token").symlink_to(target)
    result = run_script("factory-firstboot", image_root)
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "untouched\n"
    assert not (home / "jupyter-token").is_symlink()
    service, admin = tokens(image_root)
    assert service == admin


def test_first_boot_runs_after_the_bases_own_host_key_unit():
    """The Debian base enables a unit of its own that runs `ssh-keygen -A` before sshd. Beside
    first boot, both made an RSA key and the later one won: the console showed a key sshd did
    not offer (the deploy test's fingerprints). First boot must wait for it."""
    from factory.base import recipe

    source = Path(recipe.__file__).read_text()
    unit = "factory-ssh-hostkeys.service"
    assert unit in source and "ExecStart=/usr/bin/ssh-keygen -A" in source
    service = (PROVISIONERS_DIR / "factory-firstboot.service").read_text()
    after = {u for line in re.findall(r"^After=(.*)$", service, re.M) for u in line.split()}
    assert unit in after, service
