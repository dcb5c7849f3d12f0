"""Stage 1: load a client profile (YAML) into a validated `Profile`.

The pydantic models are the single source of truth for the profile format. Every error is
reported as one line: `file:line: field.path: what is wrong (what to do)`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

import paramiko
import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from factory import cpu
from factory.errors import ProfileError

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
    model_config = ConfigDict(extra="forbid", frozen=True)


class CloudImage(Strict):
    url: str = Field(description="http(s):// or file:// URL of a qcow2 cloud image.")
    sha256: str = Field(description="sha256 of the image, 64 lowercase hex digits.")
    os: Literal["debian", "ubuntu"] = "debian"

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
            if not _plain_channel(channel):
                raise ValueError(f"channel {channel!r} has characters a URL or path cannot have")
        return channels

    _conda_specs = field_validator("conda")(classmethod(lambda cls, v: _check_conda_specs(v)))
    _pip_specs = field_validator("pip")(classmethod(lambda cls, v: _check_package_specs(v)))


def _plain_channel(channel: object) -> bool:
    return (
        bool(channel) and isinstance(channel, str) and not any(c in channel for c in "\n\r\0'\"`$ ")
    )


class TLS(Strict):
    certificate: str = Field(
        description="PEM certificate chain of the client, leaf first, relative to the profile "
        "(under its folder or FACTORY_ALLOWED_ROOTS); the leaf must not have expired."
    )
    key: str = Field(
        description="Unencrypted PEM private key of the leaf certificate, relative to the "
        "profile (under its folder or FACTORY_ALLOWED_ROOTS)."
    )


class Jupyter(Strict):
    enabled: bool = Field(True, description="Install Jupyter Lab as a systemd service.")
    port: int = Field(8888, ge=1024, le=65535, description="Port Jupyter binds on 127.0.0.1.")
    packages: list[str] = Field(
        default_factory=lambda: ["jupyterlab"], description="pip specs of the Jupyter server."
    )
    tls: TLS | None = Field(
        None,
        description="The client's own certificate for nginx; without it a self-signed one is "
        "made on the image's first boot.",
    )

    _pip_specs = field_validator("packages")(classmethod(lambda cls, v: _check_package_specs(v)))


class GPU(Strict):
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
        from factory import gpu

        problem = gpu.driver_problem(self.driver, self.cuda)
        for framework, version in self.frameworks.items():
            problem = problem or gpu.framework_problem(framework, version, self.cuda)
        if problem:
            raise ValueError(problem)
        return self


class Security(Strict):
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


class Monitoring(Strict):
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


class Profile(Strict):
    client: str = Field(description="Client short name: lowercase letters, digits and '-'.")
    project: str = Field(description="Project short name: lowercase letters, digits and '-'.")
    version: int = Field(
        ge=1, le=9999, strict=True, description="Delivery version, the N in client_project_vN."
    )
    industry: str = Field(
        "generic", max_length=64, description="Industry, e.g. banking, healthcare."
    )
    description: str = Field("", max_length=500, description="One line shown in the OVA.")
    base: Literal["debian-12"] | CloudImage = Field(
        "debian-12", description="'debian-12' (built from Debian's mirror) or a cloud image."
    )
    resources: Resources = Field(default_factory=Resources)
    admin: Admin
    conda: Conda = Field(default_factory=Conda)
    environments: Annotated[list[Environment], Field(min_length=1)]
    jupyter: Jupyter = Field(default_factory=Jupyter)
    gpu: GPU | None = Field(None, description="NVIDIA driver, CUDA and framework builds.")
    cpu_baseline: Literal[cpu.LEVELS] = Field(  # type: ignore[valid-type]
        cpu.DEFAULT_LEVEL,
        description="The oldest CPU the client runs, as an x86-64 level: v1 (any x86-64), v2 "
        "(SSE4.2 and POPCNT, 2009 on; the default and NumPy 2.4's baseline), v3 (AVX2, 2015 "
        "on) or v4 (AVX-512). The validator boots at this level and the lock refuses wheels "
        "that need more.",
    )
    security: Security = Field(default_factory=Security)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    notebooks: list[str] = Field(
        default_factory=list,
        description="Sample notebooks (.ipynb, relative to the file that names them) shipped "
        "into Jupyter's home; the validator runs each one.",
    )
    virtual_packages: dict[str, str] = Field(
        default_factory=dict,
        description="Virtual packages of the target for the solver, e.g. {__cuda: '12.2'}; "
        "__glibc, __linux and __unix come from the base OS unless set here.",
    )
    offline: bool = Field(
        False,
        description="Air-gapped: build and run with the network cut; the image keeps a private "
        "conda channel and pip wheelhouse, and .condarc and pip.conf point only at them.",
    )
    insecure_channels: list[str] = Field(
        default_factory=list,
        description="Plain http:// channel URLs the environments may use, each written exactly "
        "as in `channels`. Without TLS anyone on the network path chooses what gets locked, so "
        "http:// channels are refused unless listed here.",
    )
    extends: str | list[str] | None = Field(
        None,
        description="Profile file(s) or preset name(s) this profile builds on; files under "
        "this profile's folder or FACTORY_ALLOWED_ROOTS.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_environment_name(cls, data: object) -> object:
        """The first environment is named client_project_vN when the profile names none."""
        if not isinstance(data, dict) or not isinstance(data.get("environments"), list):
            return data
        envs = data["environments"]
        if envs and isinstance(envs[0], dict) and "name" not in envs[0]:
            name = f"{data.get('client')}_{data.get('project')}_v{data.get('version')}"
            data = {
                **data,
                "environments": [{**envs[0], "name": name.replace("-", "_")}, *envs[1:]],
            }
        return data

    @field_validator("virtual_packages")
    @classmethod
    def _virtual_names(cls, packages: dict[str, str]) -> dict[str, str]:
        for name, version in packages.items():
            if not re.match(r"^__[a-z][a-z0-9_-]*$", name):
                raise ValueError(f"'{name}' is not a virtual package name such as '__cuda'")
            if not re.match(r"^[0-9][0-9a-z.]*$", str(version)):
                raise ValueError(f"{name}: '{version}' is not a version such as '12.2'")
        return {name: str(version) for name, version in packages.items()}

    @field_validator("base", mode="before")
    @classmethod
    def _known_base(cls, value: object) -> object:
        if isinstance(value, str) and value != "debian-12":
            raise ValueError(
                f"unknown base '{value}'; use 'debian-12' or a cloud image "
                "{url: ..., sha256: ...}"
            )
        return value

    @field_validator("client", "project")
    @classmethod
    def _name_part(cls, value: str) -> str:
        if not NAME_PART.match(value):
            raise ValueError("must start with a letter and use only a-z, 0-9 and '-' (max 31)")
        return value

    @field_validator("description", "industry")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in value):
            raise ValueError("must be a single line of printable text")
        return value

    @model_validator(mode="after")
    def _unique_environments(self) -> Profile:
        seen: set[str] = set()
        for env in self.environments:
            if env.name in seen:
                raise ValueError(f"environments: duplicate name '{env.name}'; names must differ")
            if env.name == "jupyter" and self.jupyter.enabled:
                raise ValueError(
                    "environments: 'jupyter' is the Jupyter server's own "
                    "environment; choose another name"
                )
            seen.add(env.name)
        return self

    @model_validator(mode="after")
    def _disk_fits_environments(self) -> Profile:
        needed = min_disk_gib(self)
        if self.resources.disk < needed:
            raise ValueError(
                f"resources.disk: {self.resources.disk} GiB is too small for "
                f"{len(self.environments)} environment(s)"
                f"{' and Jupyter' if self.jupyter.enabled else ''}; "
                f"set it to at least {needed}"
            )
        return self

    @model_validator(mode="after")
    def _network_needs(self) -> Profile:
        if self.offline and self.security.unattended_upgrades:
            raise ValueError(
                "security.unattended_upgrades: an offline image cannot fetch updates; "
                "set it to false or set offline: false"
            )
        if self.offline and self.monitoring.prometheus:
            raise ValueError(
                "monitoring.prometheus: the Prometheus server is installed from Debian's "
                "mirror and an offline build has no network; set it to false"
            )
        return self

    @model_validator(mode="after")
    def _gpu_fits_the_base(self) -> Profile:
        from factory import gpu

        debian = self.base == "debian-12" or getattr(self.base, "os", "") == "debian"
        if self.gpu is None or not debian:
            return self
        if self.gpu.driver != gpu.DEBIAN_12_DRIVER:
            raise ValueError(
                f"gpu.driver: Debian 12's non-free archive has driver {gpu.DEBIAN_12_DRIVER}, "
                f"not {self.gpu.driver}; set gpu.driver: '{gpu.DEBIAN_12_DRIVER}' or use an "
                "Ubuntu cloud image"
            )
        if self.gpu.toolkit and gpu.minor(self.gpu.cuda) != gpu.DEBIAN_12_TOOLKIT:
            raise ValueError(
                f"gpu.toolkit: Debian 12 ships the CUDA toolkit {gpu.DEBIAN_12_TOOLKIT}; set "
                f"gpu.cuda: '{gpu.DEBIAN_12_TOOLKIT}' or gpu.toolkit: false"
            )
        return self

    @model_validator(mode="after")
    def _miniforge_stays_on_conda_forge(self) -> Profile:
        if self.conda.installer != "miniforge":
            return self
        for env in self.environments:
            named = [spec_channel(s) for s in env.conda]
            for channel in [*env.channels, *(c for c in named if c)]:
                if ANACONDA_CHANNELS.match(channel):
                    raise ValueError(
                        f"environments: '{env.name}' uses Anaconda's channel '{channel}', but "
                        "the miniforge installer keeps the image on conda-forge; use "
                        "conda-forge or a private mirror, or installer: miniconda"
                    )
        return self

    @model_validator(mode="after")
    def _channels_use_tls(self) -> Profile:
        for url in self.insecure_channels:
            if not re.match(r"^http://\S+$", url):
                raise ValueError(
                    f"insecure_channels: '{url}' is not an http:// URL; list only the plain "
                    "http:// channels the environments use"
                )
        for index, env in enumerate(self.environments):
            for number, channel in enumerate(env.channels):
                if channel.lower().startswith("http://") and channel not in self.insecure_channels:
                    raise ValueError(
                        f"environments[{index}].channels[{number}]: '{channel}' is plain "
                        "http://, so anyone on the network path chooses what gets locked; use "
                        "https://, or accept that by listing it exactly in insecure_channels"
                    )
        return self

    @model_validator(mode="after")
    def _notebooks_need_jupyter(self) -> Profile:
        if self.notebooks and not self.jupyter.enabled:
            raise ValueError(
                "notebooks: sample notebooks are shipped into Jupyter's home; "
                "set jupyter.enabled: true or remove them"
            )
        return self

    def target_virtual_packages(self) -> dict[str, str]:
        """What the target machine offers the conda solver: derived from the base OS, then
        the profile's own settings."""
        os_name = "debian" if isinstance(self.base, str) else self.base.os
        glibc = {"debian": "2.36", "ubuntu": "2.35"}[os_name]
        derived = {"__glibc": glibc, "__linux": "6.1", "__unix": "0"}
        if self.gpu is not None:
            derived["__cuda"] = self.gpu.cuda
        return {**derived, **self.virtual_packages}

    def open_ports(self) -> list[int]:
        """The TCP ports the firewall opens: SSH, Jupyter's HTTPS (and its redirect),
        the node exporter when monitoring is on, and the profile's own."""
        ports = {22, *self.security.open_ports}
        if self.jupyter.enabled:
            ports |= {80, 443}
        if self.monitoring.enabled:
            ports.add(9100)
        return sorted(ports)

    @property
    def name(self) -> str:
        """The delivery name, client_project_vN (with '-' turned into '_')."""
        return f"{self.client}_{self.project}_v{self.version}".replace("-", "_")


def min_disk_gib(profile: Profile) -> int:
    """A floor for the disk: the OS, 1 GiB per environment, 1 GiB for Jupyter."""
    return 4 + len(profile.environments) + (1 if profile.jupyter.enabled else 0)


class LoadedProfile(BaseModel):
    """A validated profile with where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    profile: Profile
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.profile.name

    def resolve_channel(self, channel: str) -> str:
        """Return a channel as a URL; relative paths are taken from the profile's folder."""
        if re.match(r"^[a-z][a-z0-9+.-]*://", channel):
            return channel
        if "/" not in channel and not channel.startswith("."):
            return f"https://conda.anaconda.org/{channel}"
        return (self.path.parent / channel).resolve().as_uri()


def _walk(root: yaml.Node | None, loc: tuple) -> tuple[int | None, bool]:
    """The YAML line of a field path (or of its nearest parent) and whether the whole path
    exists in this document."""
    node, line = root, (root.start_mark.line + 1) if root is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                return line, False
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line, False
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line, False
    return line, True


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    return _walk(root, loc)[0]


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in (
            "CloudImage",
            "literal['debian-12']",
            "function-after[_unique_environments()]",
        ):
            continue
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "(top level)"


def _describe(error: dict, model_fields: list[str]) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        parent = loc[-1]
        close = difflib.get_close_matches(str(parent), model_fields, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(model_fields)}"
        return f"unknown key ({hint})"
    if kind == "missing":
        return "required field is missing (add it)"
    message = error["msg"].removeprefix("Value error, ")
    return message


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = Profile
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        candidates = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _pick_error(errors: list[dict]) -> dict:
    """Prefer the most specific error; skip union branches that only say the literal mismatched."""
    useful = [e for e in errors if e["type"] != "literal_error" or len(errors) == 1]
    useful.sort(key=lambda e: e["type"] != "extra_forbidden")
    return (useful or errors)[0]


PRESETS_DIR = Path(__file__).resolve().parent / "presets"
# The example profiles of a checkout (profiles/ beside the package), which users start from;
# an installed package has none.
_CHECKOUT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = _CHECKOUT / "profiles" if (_CHECKOUT / "pyproject.toml").is_file() else PRESETS_DIR
ALLOWED_ROOTS_ENV_VAR = "FACTORY_ALLOWED_ROOTS"
MAX_TEXT_BYTES = 1 << 20  # profiles, environment files, TLS files
MAX_NOTEBOOK_BYTES = 64 << 20
SPECIAL_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))


def allowed_roots(profile_path: Path) -> tuple[Path, ...]:
    """The folders every file a profile names must lie in, after symlinks: the profile's own
    folder, the presets, the example profiles, and the folders listed in
    $FACTORY_ALLOWED_ROOTS (separated by os.pathsep)."""
    listed = os.environ.get(ALLOWED_ROOTS_ENV_VAR, "").split(os.pathsep)
    extra = [Path(p).expanduser().resolve() for p in listed if p.strip()]
    return (profile_path.resolve().parent, PRESETS_DIR, EXAMPLES_DIR, *extra)


class _KeyProblem(Exception):
    """A mapping key the profile format refuses (duplicate or merge key)."""

    def __init__(self, mapping: yaml.MappingNode, key: yaml.Node, problem: str) -> None:
        super().__init__(problem)
        self.mapping, self.key = mapping, key


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and merge keys (`<<`): a reviewer reads the
    first block, PyYAML would keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _KeyProblem(
                    node, key_node, "merge keys (<<) are not allowed; write the keys out"
                )
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node:
                raise _KeyProblem(
                    node,
                    key_node,
                    f"duplicate key (first at line {first.start_mark.line + 1}); remove one",
                )
        return super().construct_mapping(node, deep=deep)


def _path_to(node: yaml.Node | None, target: yaml.Node, loc: tuple = ()) -> tuple | None:
    """The field path of `target` in the node tree under `node` (aliases are not followed)."""
    if node is target:
        return loc
    if isinstance(node, yaml.MappingNode):
        children = [(k.value, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
    elif isinstance(node, yaml.SequenceNode):
        children = list(enumerate(node.value))
    else:
        return None
    for part, child in children:
        if child.start_mark.index > node.start_mark.index:  # not an alias pointing back
            found = _path_to(child, target, (*loc, part))
            if found is not None:
                return found
    return None


def _read_file(path: Path, where: str, limit: int, kind: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (devices and pipes are refused
    without blocking on them)."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise ProfileError(f"{where}: cannot read {kind} ({error.strerror})") from None
    with os.fdopen(handle, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ProfileError(
                f"{where}: {path} is a special file (a device, pipe or socket), not a {kind}; "
                "name a regular file"
            )
        raw = file.read(limit + 1)
    if len(raw) > limit:
        raise ProfileError(
            f"{where}: {path.name} is larger than {limit >> 20} MiB, too large for a {kind}; "
            "check that the path names the right file"
        )
    return raw


def _parse_yaml(path: Path, raw: bytes, kind: str) -> tuple[yaml.Node | None, object]:
    """The node tree (for line numbers) and the data of a YAML file, read strictly."""
    try:
        text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8 text; save the {kind} as UTF-8") from None
    loader = _StrictLoader(text)
    root = None
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    except _KeyProblem as problem:
        loc = (*(_path_to(root, problem.mapping) or ()), problem.key.value)
        line = problem.key.start_mark.line + 1
        raise ProfileError(f"{path}:{line}: {_field_path(loc)}: {problem}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ProfileError(f"{where}: not valid YAML ({problem}); fix the syntax") from None
    finally:
        loader.dispose()


@dataclass(frozen=True)
class _Document:
    path: Path
    raw: bytes
    root: yaml.Node
    data: dict
    roots: tuple[Path, ...]  # the folders the files it names must lie in


def _read_document(path: Path, roots: tuple[Path, ...]) -> _Document:
    raw = _read_file(path, str(path), MAX_TEXT_BYTES, "profile")
    root, data = _parse_yaml(path, raw, "profile")
    if data is None:
        raise ProfileError(f"{path}: profile is empty; start from profiles/demo.yaml")
    if not isinstance(data, dict):
        raise ProfileError(f"{path}:1: a profile is a mapping of keys (client, project, ...)")
    return _Document(path, raw, root, data, roots)


def _where(document: _Document, loc: tuple) -> str:
    return f"{document.path}:{_line_of(document.root, loc)}: {_field_path(loc)}"


def _confined(where: str, value: str, path: Path, roots: tuple[Path, ...]) -> Path:
    """`path` after symlinks; refused under /proc, /sys or /dev, and outside `roots`."""
    resolved = path.resolve()
    shown = value if value == str(resolved) else f"{value} (that is {resolved})"
    special = next((tree for tree in SPECIAL_TREES if resolved.is_relative_to(tree)), None)
    if special is not None:
        raise ProfileError(
            f"{where}: {shown} is a special file (under {special}), not a regular file; "
            "name a regular file"
        )
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ProfileError(
            f"{where}: {shown} is outside this profile's folder {roots[0]}; move it there, or "
            f"allow its folder (factory --allow-root DIR, or {ALLOWED_ROOTS_ENV_VAR})"
        )
    return resolved


def _named_file(document: _Document, loc: tuple, value: object, suffix: str | tuple = "") -> Path:
    """A file named in the profile, made absolute from the folder of the file naming it; it
    must be a regular file under the allowed roots."""
    where = _where(document, loc)
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(f"{where}: give a file path")
    path = _confined(where, value, document.path.parent / value, document.roots)
    if not path.exists():
        raise ProfileError(f"{where}: no file {path}; fix the path (relative to this file)")
    if not path.is_file():
        raise ProfileError(f"{where}: {path} is not a regular file; name a regular file")
    if not path.name.endswith(suffix):
        kinds = " or ".join([suffix] if isinstance(suffix, str) else suffix)
        raise ProfileError(f"{where}: {path.name} is not a {kinds} file")
    return path


def _parent_paths(document: _Document) -> list[Path]:
    extends = document.data.get("extends", [])
    names = [extends] if isinstance(extends, str) else extends
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProfileError(
            f"{_where(document, ('extends',))}: give a file path or a preset name, or a list "
            "of them"
        )
    parents = []
    for index, name in enumerate(names):
        loc = ("extends",) if isinstance(extends, str) else ("extends", index)
        if name.endswith((".yaml", ".yml")) or "/" in name:
            parents.append(_named_file(document, loc, name))
            continue
        parent = PRESETS_DIR / f"{name}.yaml"
        if not re.match(r"^[a-z0-9-]+$", name) or not parent.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
            raise ProfileError(f"{_where(document, loc)}: no preset '{name}' (presets: {known})")
        parents.append(parent)
    return parents


def _load_chain(
    path: Path, roots: tuple[Path, ...], stack: tuple[Path, ...] = ()
) -> list[_Document]:
    """The profile and everything it extends, most specific first."""
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(p.name for p in (*stack, path))
        raise ProfileError(f"{stack[-1]}: extends: cycle {cycle}; remove one of these extends")
    document = _read_document(path, roots)
    chain = [document]
    for parent in _parent_paths(document):
        chain += _load_chain(parent, roots, (*stack, path))
    return chain


def _merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; anything else in `override` replaces `base`."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _local_channel(where: str, channel: object, folder: Path, roots: tuple[Path, ...]) -> object:
    """A channel, with a local channel folder made a file:// URL (after symlinks) from
    `folder`. An existing folder must lie under the allowed roots or the factory cache's
    channels; a missing one (a delivered profile read on another host) is left to the solver."""
    from factory.cache import cache_dir

    if not isinstance(channel, str) or not _plain_channel(channel):
        return channel  # the schema says what is wrong
    if re.match(r"^[a-z][a-z0-9+.-]*://", channel):
        url = urlparse(channel)
        if url.scheme != "file":
            return channel
        if url.netloc not in ("", "localhost"):
            raise ProfileError(f"{where}: {channel} names a host; write file:///absolute/path")
        path = Path(unquote(url.path))
    elif "/" not in channel and not channel.startswith("."):
        return channel
    else:
        path = folder / channel
    resolved = path.resolve()
    if not resolved.exists():
        return resolved.as_uri()  # nothing to read here; the solver says it is missing
    _confined(where, channel, resolved, (*roots, cache_dir() / "channels"))
    if not resolved.is_dir():
        raise ProfileError(
            f"{where}: {channel} is not a folder; a local channel is a folder holding "
            "noarch/ and linux-64/ with their repodata.json"
        )
    return resolved.as_uri()


CONDA_PYTHON = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*::)?python\s*=+\s*(3\.\d+)")


def _imported_environment(document: _Document, index: int, env: dict) -> dict:
    """An environment with its environment.yml merged in (the profile's own keys win). The
    file is read as conda reads it, and a wrong shape is one line naming its file and line."""
    loc = ("environments", index, "environment_file")
    path = _named_file(document, loc, env["environment_file"], (".yml", ".yaml"))
    where = _where(document, loc)
    root, spec = _parse_yaml(
        path, _read_file(path, where, MAX_TEXT_BYTES, "environment file"), "environment file"
    )
    if not isinstance(spec, dict) or spec.get("dependencies") is None:
        raise ProfileError(f"{where}: {path} has no 'dependencies' list (conda env export)")
    deps = spec["dependencies"]

    def at(*field: str | int) -> str:
        return f"{path}:{_line_of(root, field)}: {_field_path(field)}"

    if not isinstance(deps, list):
        raise ProfileError(
            f"{at('dependencies')}: must be a list, one '- spec' per line (conda env export)"
        )
    if not isinstance(spec.get("name", ""), str):
        raise ProfileError(f"{at('name')}: must be a string such as 'scoring' (quote it)")
    channels = spec.get("channels") or []
    if isinstance(channels, str):
        raise ProfileError(
            f"{at('channels')}: is the single string '{channels}', not a list; write "
            f"channels: [{channels}] (conda reads a list of channel names or URLs)"
        )
    if not isinstance(channels, list):
        raise ProfileError(f"{at('channels')}: must be a list of channel names or URLs")
    for number, channel in enumerate(channels):
        if not isinstance(channel, str):
            raise ProfileError(
                f"{at('channels', number)}: must be a channel name or URL, not "
                f"{type(channel).__name__} {channel!r} (quote it)"
            )
    conda: list[str] = []
    pip: list[str] = []
    for number, dep in enumerate(deps):
        if isinstance(dep, str):
            conda.append(dep)
        elif isinstance(dep, dict) and list(dep) == ["pip"]:
            entries = dep["pip"]
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise ProfileError(
                    f"{at('dependencies', number, 'pip')}: must be a list of pip requirement "
                    "strings, one '- requirement' per line"
                )
            pip += entries
        else:
            raise ProfileError(
                f"{at('dependencies', number)}: must be a conda spec such as 'numpy>=1.26' or "
                f"a 'pip:' list, not {dep!r}; fix or re-export the file"
            )
    python = next((m.group(1) for d in conda if (m := CONDA_PYTHON.match(d))), None)
    channels = [
        _local_channel(at("channels", number), channel, path.parent, document.roots)
        for number, channel in enumerate(channels)
    ]
    imported = {
        "name": spec.get("name"),
        "channels": channels,
        "conda": conda,
        "pip": pip,
        "python": python,
    }
    merged = {k: v for k, v in imported.items() if v} | env
    return {**merged, "environment_file": str(path)}


def _environment_paths(document: _Document, index: int, env: object) -> object:
    """An environment with its local channels and its environment file's content resolved."""
    if not isinstance(env, dict):
        return env
    channels = env.get("channels")
    if isinstance(channels, list):
        where = [
            _where(document, ("environments", index, "channels", n)) for n in range(len(channels))
        ]
        channels = [
            _local_channel(w, c, document.path.parent, document.roots)
            for w, c in zip(where, channels, strict=True)
        ]
        env = {**env, "channels": channels}
    if "environment_file" in env:
        env = _imported_environment(document, index, env)
    return env


def _notebook(document: _Document, loc: tuple, value: object) -> str:
    """A sample notebook named in the profile: a JSON object, as Jupyter saves it."""
    path = _named_file(document, loc, value, ".ipynb")
    where = _where(document, loc)
    try:
        notebook = json.loads(_read_file(path, where, MAX_NOTEBOOK_BYTES, "notebook"))
    except ValueError as error:
        raise ProfileError(
            f"{where}: {path.name} is not a notebook (not JSON: {error}); save it again from "
            "Jupyter"
        ) from None
    if not isinstance(notebook, dict) or not isinstance(notebook.get("metadata", {}), dict):
        raise ProfileError(
            f"{where}: {path.name} is not a notebook (JSON, but not an object with cells and "
            "metadata); save it again from Jupyter"
        )
    return str(path)


def _absolute_paths(document: _Document) -> dict:
    """The document's data with the files and local channels it names made absolute, each
    checked to lie under the allowed roots."""
    data = dict(document.data)
    notebooks = data.get("notebooks")
    if isinstance(notebooks, list):
        data["notebooks"] = [
            _notebook(document, ("notebooks", i), n) for i, n in enumerate(notebooks)
        ]
    envs = data.get("environments")
    if isinstance(envs, list):
        data["environments"] = [_environment_paths(document, i, env) for i, env in enumerate(envs)]
    tls = (data.get("jupyter") or {}).get("tls") if isinstance(data.get("jupyter"), dict) else None
    if isinstance(tls, dict):
        resolved = {
            key: str(_named_file(document, ("jupyter", "tls", key), tls[key]))
            for key in ("certificate", "key")
            if key in tls
        }
        data["jupyter"] = {**data["jupyter"], "tls": {**tls, **resolved}}
    return data


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_client_tls(chain: list[_Document], tls: TLS) -> None:
    """The client's certificate is a PEM chain whose leaf has not expired, and its key an
    unencrypted PEM private key of that leaf (nginx reads both at boot, unattended)."""
    cert_at = _where_in(chain, ("jupyter", "tls", "certificate"))
    key_at = _where_in(chain, ("jupyter", "tls", "key"))
    cert_path, key_path = Path(tls.certificate), Path(tls.key)
    pem = _read_file(cert_path, cert_at, MAX_TEXT_BYTES, "certificate")
    if b"PRIVATE KEY-----" in pem:
        raise ProfileError(
            f"{cert_at}: {cert_path.name} also holds a private key, and the certificate is "
            "installed world-readable; keep only the certificates in it and the key in "
            "jupyter.tls.key"
        )
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        raise ProfileError(
            f"{cert_at}: {cert_path.name} is not a PEM certificate chain (-----BEGIN "
            "CERTIFICATE-----, leaf first); convert it with `openssl x509 -outform PEM`"
        ) from None
    expiry = leaf.not_valid_after_utc
    if expiry <= datetime.now(UTC):
        raise ProfileError(
            f"{cert_at}: {cert_path.name} expired on {expiry:%Y-%m-%d}; renew the certificate"
        )
    try:
        key = serialization.load_pem_private_key(
            _read_file(key_path, key_at, MAX_TEXT_BYTES, "private key"), password=None
        )
    except TypeError:
        raise ProfileError(
            f"{key_at}: {key_path.name} is encrypted, and nginx starts unattended; give it "
            "unencrypted (`openssl pkey -in KEY -out KEY.pem`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ProfileError(
            f"{key_at}: {key_path.name} is not a PEM private key (-----BEGIN PRIVATE "
            "KEY-----); export the key as PEM"
        ) from None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise ProfileError(
            f"{key_at}: {key_path.name} is not the key of {cert_path.name}'s first "
            "certificate; name the key that certificate was issued for"
        )


def _where_in(chain: list[_Document], loc: tuple) -> str:
    """file:line: field of `loc` in the most specific document of the chain that sets it."""
    return _where(next((d for d in chain if _walk(d.root, loc)[1]), chain[0]), loc)


def _parse_loc(text: str) -> tuple:
    """('environments', 0, 'channels') from 'environments[0].channels'."""
    return tuple(
        int(part[1:-1]) if part.startswith("[") else part
        for part in re.findall(r"\[\d+\]|[a-z_]+", text)
    )


def load_profile(path: Path | str) -> LoadedProfile:
    """Read and validate a profile (and what it extends), raising ProfileError with one line
    on any problem."""
    chain = _load_chain(Path(path), allowed_roots(Path(path)))
    data: dict = {}
    for document in reversed(chain):
        data = _merge(data, _absolute_paths(document))
    data.pop("extends", None)
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        error = _pick_error(exc.errors())
        loc = tuple(p for p in error["loc"] if not str(p).startswith("function-"))
        detail = _describe(error, _fields_at(loc))
        named = re.match(r"^([a-z_]+(?:\.[a-z_]+|\[\d+\])*): (.*)$", detail)
        if named and list(loc) == list(_parse_loc(named.group(1)))[: len(loc)]:
            loc, detail = _parse_loc(named.group(1)), named.group(2)
        raise ProfileError(f"{_where_in(chain, loc)}: {detail}") from None
    if profile.jupyter.tls is not None:
        _check_client_tls(chain, profile.jupyter.tls)
    digest = hashlib.sha256(b"".join(d.raw for d in chain))
    for notebook in profile.notebooks:
        digest.update(Path(notebook).read_bytes())
    return LoadedProfile(profile=profile, path=chain[0].path, sha256=digest.hexdigest())
