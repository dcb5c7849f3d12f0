"""The profile model: the single source of truth for the profile format. It validates every
profile, and `factory.profile.docs` generates the JSON schema and the reference docs from it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from factory import cpu, gpu
from factory.profile.sections import (
    ANACONDA_CHANNELS,
    GPU,
    NAME_PART,
    Admin,
    CloudImage,
    Conda,
    Environment,
    Jupyter,
    Monitoring,
    Resources,
    Security,
    Signing,
    Strict,
    one_line,
    spec_channel,
)
from factory.profile.services import Service, Snapshots


class Profile(Strict):
    """A client profile: one delivered VM, named client_project_vN."""

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
    signing: Signing | None = Field(
        None,
        description="Sign SHA256SUMS and the OVA with the delivery team's key; without it the "
        "delivery is unsigned.",
    )
    notebooks: list[str] = Field(
        default_factory=list,
        description="Sample notebooks (.ipynb, relative to the file that names them, or "
        "preset:NAME for one the presets ship) shipped into Jupyter's home; the validator runs "
        "each one on the kernel its metadata names (else the first environment's).",
    )
    services: list[Service] = Field(
        default_factory=list,
        description="The client's own services (e.g. a model behind a web API), each a systemd "
        "unit behind nginx at https://HOST/<name>/.",
    )
    snapshots: Snapshots | None = Field(
        None,
        description="Scheduled snapshots of the environments to /var/backups/factory, e.g. "
        "{every: daily, keep: 14}; `factory-env rollback ENV SNAPSHOT` restores one.",
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
        return one_line(value)

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

    @model_validator(mode="after")
    def _services_fit(self) -> Profile:
        envs = [env.name for env in self.environments]
        taken = {self.jupyter.port: "jupyter.port"}
        for index, service in enumerate(self.services):
            where = f"services[{index}]"
            if not self.jupyter.enabled:
                raise ValueError(
                    f"{where}: services are served by Jupyter's nginx; set jupyter.enabled: "
                    "true or remove services"
                )
            if service.environment not in envs:
                raise ValueError(
                    f"{where}.environment: no environment '{service.environment}'; use one of "
                    f"{', '.join(envs)}"
                )
            if service.port in taken or service.port in self.security.open_ports:
                other = taken.get(service.port, "security.open_ports")
                raise ValueError(
                    f"{where}.port: {service.port} is also {other}; a service listens on "
                    "127.0.0.1 only, behind nginx: choose a free port"
                )
            taken[service.port] = f"{where}.port"
            if [s.name for s in self.services].count(service.name) > 1:
                raise ValueError(f"{where}.name: duplicate name '{service.name}'")
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
