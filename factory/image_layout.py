"""Where things live inside the image: the one table of in-image paths.

render.py writes them into settings.sh (as FACTORY_* variables) and into the Packer template;
the stage scripts read those variables; the checks import them from here. The scripts that run
later in the delivered image (factory-firstboot, factory-rotate-token, seal.sh) read the same
variables from the installed copy, SETTINGS_FILE, whose own path is the one they spell out.
"""

from __future__ import annotations

from pathlib import PurePosixPath

# Uploaded by Packer (or copied in by the host-side stage) and removed when the image is sealed.
PAYLOAD_DIR = PurePosixPath("/tmp/factory-payload")
PAYLOAD_CHANNEL = PAYLOAD_DIR / "channel"

CONDA_PREFIX = PurePosixPath("/opt/conda")
CONDA_ENVS = CONDA_PREFIX / "envs"
JUPYTER_ENV_PREFIX = CONDA_ENVS / "jupyter"

CONFIG_DIR = PurePosixPath("/etc/factory")
SETTINGS_FILE = CONFIG_DIR / "settings.sh"
JUPYTER_TOKEN_FILE = CONFIG_DIR / "jupyter.env"
TLS_DIR = CONFIG_DIR / "tls"
TLS_CERTIFICATE = TLS_DIR / "jupyter.crt"
TLS_KEY = TLS_DIR / "jupyter.key"
# Present when the client supplied the certificate: first boot and sealing leave it alone.
TLS_CLIENT_SUPPLIED = TLS_DIR / "client-supplied"

JUPYTER_HOME = PurePosixPath("/srv/jupyter")
NOTEBOOKS_DIR = JUPYTER_HOME / "notebooks"
SAMPLES_DIR = NOTEBOOKS_DIR / "samples"

# The client's services: each in its own folder, its units named factory-service-<name>.
SERVICES_DIR = PurePosixPath("/srv/services")
SERVICES_CONFIG_DIR = CONFIG_DIR / "services"
NGINX_SERVICES_DIR = PurePosixPath("/etc/nginx/factory-services")
# nginx's log of the requests to Jupyter (provisioners/30-jupyter.sh), kept for the audit.
JUPYTER_ACCESS_LOG = PurePosixPath("/var/log/nginx/jupyter-access.log")
# The environments' locks as built, and the snapshots taken of them.
LOCKS_DIR = PurePosixPath("/opt/factory/locks")
SNAPSHOTS_DIR = PurePosixPath("/var/backups/factory")


def settings() -> dict[str, str]:
    """The layout as settings.sh variables, for the stage scripts and the in-image tools."""
    return {
        "FACTORY_PAYLOAD_DIR": str(PAYLOAD_DIR),
        "FACTORY_CONDA_PREFIX": str(CONDA_PREFIX),
        "FACTORY_CONDA_ENVS": str(CONDA_ENVS),
        "FACTORY_CONFIG_DIR": str(CONFIG_DIR),
        "FACTORY_JUPYTER_TOKEN_FILE": str(JUPYTER_TOKEN_FILE),
        "FACTORY_TLS_DIR": str(TLS_DIR),
        "FACTORY_TLS_CERTIFICATE": str(TLS_CERTIFICATE),
        "FACTORY_TLS_KEY": str(TLS_KEY),
        "FACTORY_TLS_CLIENT_SUPPLIED": str(TLS_CLIENT_SUPPLIED),
        "FACTORY_JUPYTER_HOME": str(JUPYTER_HOME),
        "FACTORY_NOTEBOOKS_DIR": str(NOTEBOOKS_DIR),
        "FACTORY_SAMPLES_DIR": str(SAMPLES_DIR),
        "FACTORY_SERVICES_DIR": str(SERVICES_DIR),
        "FACTORY_SERVICES_CONFIG_DIR": str(SERVICES_CONFIG_DIR),
        "FACTORY_NGINX_SERVICES_DIR": str(NGINX_SERVICES_DIR),
        "FACTORY_LOCKS_DIR": str(LOCKS_DIR),
        "FACTORY_SNAPSHOTS_DIR": str(SNAPSHOTS_DIR),
    }
