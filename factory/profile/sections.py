"""The sections of a client profile: one pydantic model per key (admin, environments, conda,
jupyter, gpu, ...), with the rules that need only that section. `schema.Profile` joins them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import paramiko
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from factory import gpu

NAME_PART = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
ENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
PYTHON_VERSION = re.compile(r"^3\.\d{1,2}(\.\d{1,2})?$")
PACKAGE_SPEC = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?\s*([<>=!~]=?[^\s;'\"$`\\]*(,\s*[<>=!~]=?[^\s;'\"$`\\]*)*|\s+[0-9][^\s;'\"$`\\]*|)$"
)
# conda specs may name their channel first, as conda reads them: 'conda-forge::numpy>=1.26'.
CONDA_SPEC_CHANNEL = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)::(?!:)")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
RESERVED_USERS = {"root", "factory-build", "jupyter", "nobody", "daemon", "sys", "bin"}
BUILD_USER = "factory-build"


class Strict(BaseModel):
    """A profile section: unknown keys are refused, values never change after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CloudImage(Strict):
    """A cloud image to build on instead of the Debian base built from the mirror."""

    url: str = Field(description="http(s):// or file:// URL of a qcow2 cloud image.")
    sha256: str = Field(description="sha256 of the image, 64 lowercase hex digits.")
    os: Literal["debian", "ubuntu"] = Field(
        "debian", description="The image's distribution; the solver's glibc follows it."
    )

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        if not re.match(r"^(https?|file)://\S+$", value):
            raise ValueError("must be an http://, https:// or file:// URL")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str) -> str:
        value = value.lower().removeprefix("sha256:")
        if not SHA256.match(value):
            raise ValueError("must be 64 hex digits (run `sha256sum` on the image)")
        return value


class Resources(Strict):
    """The virtual hardware of the delivered VM."""

    cpus: int = Field(2, ge=1, le=128, description="Virtual CPUs of the delivered VM.")
    memory: int = Field(2048, ge=512, le=1048576, description="Memory in MiB.")
    disk: int = Field(8, ge=4, le=4096, description="Disk size in GiB.")
    build_memory: int | None = Field(
        None,
        ge=2048,
        le=1048576,
        description="Memory in MiB of the build VM on the build host. By default it gets "
        "`memory` capped to what the host can give (as the validation VM does); set this only "
        "when the build needs more, and the build refuses a host that cannot give it.",
    )


class Admin(Strict):
    """The client's administrator: the only account that can log in over SSH."""

    user: str = Field(description="Login name of the client's administrator.")
    ssh_keys: list[str] = Field(min_length=1, description="OpenSSH public keys allowed to log in.")

    @field_validator("user")
    @classmethod
    def _user_name(cls, value: str) -> str:
        if not USER_NAME.match(value):
            raise ValueError("must be a lowercase Unix user name such as 'analyst'")
        if value in RESERVED_USERS:
            raise ValueError(f"'{value}' is reserved; choose another user name")
        return value

    @field_validator("ssh_keys")
    @classmethod
    def _keys_parse(cls, keys: list[str]) -> list[str]:
        for index, key in enumerate(keys):
            try:
                paramiko.PublicBlob.from_string(key.strip())
            except (ValueError, TypeError, IndexError) as error:
                raise ValueError(
                    f"key {index + 1} is not an OpenSSH public key ({error}); "
                    "paste one line of ~/.ssh/id_ed25519.pub"
                ) from None
            if "\n" in key.strip():
                raise ValueError(f"key {index + 1} spans several lines; give one key per entry")
        return [key.strip() for key in keys]


def spec_channel(spec: str) -> str | None:
    """The channel a conda spec names ('pytorch::pytorch' -> 'pytorch'), or None."""
    match = CONDA_SPEC_CHANNEL.match(spec.strip())
    return match.group(1) if match else None


def package_name(spec: str) -> str:
    """The package name of a conda or pip spec ('numpy>=1.26' -> 'numpy',
    'conda-forge::numpy' -> 'numpy')."""
    spec = CONDA_SPEC_CHANNEL.sub("", spec.strip())
    return re.split(r"[\s<>=!~\[]", spec, maxsplit=1)[0].lower()


def _check_package_specs(specs: list[str]) -> list[str]:
    for spec in specs:
        if not PACKAGE_SPEC.match(spec):
            raise ValueError(f"'{spec}' is not a package spec such as 'numpy' or 'numpy>=1.26'")
    return specs


def _check_conda_specs(specs: list[str]) -> list[str]:
    for spec in specs:
        if not PACKAGE_SPEC.match(CONDA_SPEC_CHANNEL.sub("", spec)):
            raise ValueError(
                f"'{spec}' is not a conda spec such as 'numpy', 'numpy>=1.26' or "
                "'conda-forge::numpy'"
            )
    return specs


class Environment(Strict):
    """One conda environment, solved and locked on the build host."""

    name: str = Field(
        description="Environment name; installed at /opt/conda/envs/<name>. The first "
        "environment may leave it out: it is then named client_project_vN."
    )
    python: str = Field(description="Python version, e.g. '3.11'.")
    channels: list[str] = Field(
        min_length=1,
        description="Ordered conda channels: names (conda.anaconda.org/<name>), https:// URLs, "
        "or local channel folders (paths relative to the file that names them, or file:// "
        "URLs) under the profile's folder, the factory cache's channels or a folder in "
        "FACTORY_ALLOWED_ROOTS. A plain http:// URL must also be listed in insecure_channels.",
    )
    conda: list[str] = Field(
        default_factory=list,
        description="Conda package specs. 'channel::name' takes that package from that "
        "channel: the one of `channels` with that name, else conda.anaconda.org/<channel>.",
    )
    pip: list[str] = Field(default_factory=list, description="pip requirement specs.")
    environment_file: str | None = Field(
        None,
        description="An environment.yml (relative to the profile) whose channels, "
        "dependencies and pip list are imported; keys set here win.",
    )

    @field_validator("name")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if value == "base" or not ENV_NAME.match(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' and not 'base'")
        return value

    @field_validator("python")
    @classmethod
    def _python_version(cls, value: str) -> str:
        if not PYTHON_VERSION.match(str(value)):
            raise ValueError("must look like '3.11' (quote it in YAML)")
        return str(value)

    @field_validator("channels")
    @classmethod
    def _channel_strings(cls, channels: list[str]) -> list[str]:
        for channel in channels:
            if not plain_channel(channel):
                raise ValueError(f"channel {channel!r} has characters a URL or path cannot have")
        return channels

    _conda_specs = field_validator("conda")(classmethod(lambda cls, v: _check_conda_specs(v)))
    _pip_specs = field_validator("pip")(classmethod(lambda cls, v: _check_package_specs(v)))


def plain_channel(channel: object) -> bool:
    """A channel string without characters that would break out of a URL, a path or a
    shell word."""
    return (
        bool(channel) and isinstance(channel, str) and not any(c in channel for c in "\n\r\0'\"`$ ")
    )


class TLS(Strict):
    """The client's own certificate and key for Jupyter's HTTPS."""

    certificate: str = Field(
        description="PEM certificate chain of the client, leaf first, relative to the profile "
        "(under its folder or FACTORY_ALLOWED_ROOTS); the leaf must not have expired."
    )
    key: str = Field(
        description="Unencrypted PEM private key of the leaf certificate, relative to the "
        "profile (under its folder or FACTORY_ALLOWED_ROOTS)."
    )


# jsonschema 4.25 added rfc3987-syntax to the extra jupyter-events asks for; importing it costs
# 2.6 s of each Jupyter or nbconvert start (measured in the demo image), a minute and more
# under emulation.
JUPYTER_DEFAULT_PACKAGES = ("jupyterlab", "jsonschema<4.25")


class Jupyter(Strict):
    """Jupyter Lab, behind nginx on HTTPS."""

    enabled: bool = Field(True, description="Install Jupyter Lab as a systemd service.")
    port: int = Field(8888, ge=1024, le=65535, description="Port Jupyter binds on 127.0.0.1.")
    packages: list[str] = Field(
        default_factory=lambda: list(JUPYTER_DEFAULT_PACKAGES),
        description="pip specs of the Jupyter server. The default keeps jsonschema below 4.25, "
        "whose rfc3987-syntax builds a grammar on every import: Jupyter and nbconvert start "
        "five times faster without it.",
    )
    tls: TLS | None = Field(
        None,
        description="The client's own certificate for nginx; without it a self-signed one is "
        "made on the image's first boot.",
    )

    _pip_specs = field_validator("packages")(classmethod(lambda cls, v: _check_package_specs(v)))


class GPU(Strict):
    """The NVIDIA driver and CUDA release the image is built for."""

    vendor: Literal["nvidia"] = Field("nvidia", description="GPU vendor; only NVIDIA for now.")
    driver: str = Field("535", pattern=r"^\d{3}$", description="NVIDIA driver branch, e.g. '535'.")
    cuda: str = Field(pattern=r"^\d+\.\d+$", description="CUDA release, e.g. '12.2'.")
    toolkit: bool = Field(False, description="Also install the CUDA toolkit (nvcc).")
    frameworks: dict[Literal["pytorch", "tensorflow"], str] = Field(
        default_factory=dict,
        description="Framework releases whose CUDA builds must match, e.g. {pytorch: '2.3'}.",
    )

    @model_validator(mode="after")
    def _versions_fit(self) -> GPU:
        problem = gpu.driver_problem(self.driver, self.cuda)
        for framework, version in self.frameworks.items():
            problem = problem or gpu.framework_problem(framework, version, self.cuda)
        if problem:
            raise ValueError(problem)
        return self


class Security(Strict):
    """Firewall, updates and audit logs."""

    firewall: bool = Field(True, description="nftables: drop every inbound port not listed.")
    open_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=list,
        description="TCP ports to open besides 22, 80/443 (Jupyter) and 9100 (monitoring).",
    )
    unattended_upgrades: bool = Field(
        False, description="Install security updates automatically (needs a network)."
    )
    audit_retention_days: int = Field(
        90, ge=1, le=3650, description="Days the journal, audit and access logs are kept."
    )


class Signing(Strict):
    """The delivery team's signature on SHA256SUMS and on the OVA (vCenter shows the signer)."""

    key: str = Field(
        description="RSA private key (PEM) that signs the delivery; its certificate is the "
        "same path ending in .crt, and only the certificate is delivered. Relative to the file "
        "that names it, or ~/...; keep it out of the profile's folder, which is committed "
        "(e.g. ~/.config/factory/keys/team.key). `factory keygen PATH --name TEAM` makes both."
    )
    vendor: str | None = Field(
        None,
        max_length=200,
        description="The delivery team, shown as the OVA's Vendor; default: the name in the "
        "key's certificate.",
    )

    @field_validator("vendor")
    @classmethod
    def _one_line_vendor(cls, value: str | None) -> str | None:
        return None if value is None else one_line(value)


def one_line(value: str) -> str:
    """`value`, refused when it is not a single line of printable text."""
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in value):
        raise ValueError("must be a single line of printable text")
    return value


class Monitoring(Strict):
    """The Prometheus node exporter and an optional Prometheus server."""

    enabled: bool = Field(
        False,
        description="Expose the node exporter on port 9100 (it always runs; otherwise it "
        "listens on 127.0.0.1 only).",
    )
    prometheus: bool = Field(
        False, description="Also run a Prometheus server on 127.0.0.1:9090 (needs a network)."
    )


# The pinned default Miniconda: its sha256 is checked before anything is built.
MINICONDA_URL = "https://repo.anaconda.com/miniconda/Miniconda3-py310_24.9.2-0-Linux-x86_64.sh"
MINICONDA_SHA256 = "364869f004c6259268b09a667ed476080bf4f44e9c4ab06a293146df8990d43f"
ANACONDA_CHANNELS = re.compile(
    r"^(defaults|main|r|msys2|anaconda|https?://(repo\.anaconda\.com|conda\.anaconda\.org/"
    r"(anaconda|main|r))(/|$).*)$"
)


class Conda(Strict):
    """What installs the environments in the image."""

    installer: Literal["miniconda", "miniforge", "rattler"] = Field(
        "miniconda",
        description="What creates the environments in the image: 'miniconda' (the official "
        "installer), 'miniforge' (conda-forge only) or 'rattler' (no conda binary).",
    )
    url: str | None = Field(
        None,
        description="http(s):// or file:// URL of the Miniconda/Miniforge Linux x86_64 .sh "
        "(default for miniconda: a pinned release).",
    )
    sha256: str | None = Field(None, description="sha256 of that installer.")

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(https?|file)://\S+\.sh$", value):
            raise ValueError("must be an http(s):// or file:// URL of the installer's .sh")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str | None) -> str | None:
        if value is not None and not SHA256.match(value.lower()):
            raise ValueError("must be 64 hex digits (run `sha256sum` on the installer)")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _pinned(self) -> Conda:
        if self.installer == "rattler":
            return self
        if self.installer == "miniforge" and not (self.url and self.sha256):
            raise ValueError(
                "the miniforge installer is pinned: set conda.url to a Miniforge3 "
                "Linux-x86_64.sh release and conda.sha256 to its checksum"
            )
        if bool(self.url) != bool(self.sha256):
            raise ValueError("set conda.url and conda.sha256 together (the url is pinned)")
        return self

    def installer_source(self) -> tuple[str, str] | None:
        """The (url, sha256) of the conda installer, or None for rattler."""
        if self.installer == "rattler":
            return None
        if self.url and self.sha256:
            return self.url, self.sha256
        return MINICONDA_URL, MINICONDA_SHA256
