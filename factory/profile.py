"""Stage 1: load a client profile (YAML) into a validated `Profile`.

The pydantic models are the single source of truth for the profile format. Every error is
reported as one line: `file:line: field.path: what is wrong (what to do)`.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import paramiko
import yaml
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


def package_name(spec: str) -> str:
    """The package name of a conda or pip spec ('numpy>=1.26' -> 'numpy')."""
    return re.split(r"[\s<>=!~\[]", spec.strip(), maxsplit=1)[0].lower()


def _check_package_specs(specs: list[str]) -> list[str]:
    for spec in specs:
        if not PACKAGE_SPEC.match(spec):
            raise ValueError(f"'{spec}' is not a package spec such as 'numpy' or 'numpy>=1.26'")
    return specs


class Environment(Strict):
    name: str = Field(
        description="Environment name; installed at /opt/conda/envs/<name>. The first "
        "environment may leave it out: it is then named client_project_vN."
    )
    python: str = Field(description="Python version, e.g. '3.11'.")
    channels: list[str] = Field(
        min_length=1,
        description="Ordered conda channels: URLs, or paths relative to the profile file.",
    )
    conda: list[str] = Field(default_factory=list, description="Conda package specs.")
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
            if not channel or any(c in channel for c in "\n\r\0'\"`$ "):
                raise ValueError(f"channel {channel!r} has characters a URL or path cannot have")
        return channels

    _conda_specs = field_validator("conda")(classmethod(lambda cls, v: _check_package_specs(v)))
    _pip_specs = field_validator("pip")(classmethod(lambda cls, v: _check_package_specs(v)))


class TLS(Strict):
    certificate: str = Field(
        description="PEM certificate (chain) of the client, relative to the profile."
    )
    key: str = Field(description="PEM private key of that certificate, relative to the profile.")


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
    version: int = Field(ge=1, le=9999, description="Delivery version, the N in client_project_vN.")
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
    extends: str | list[str] | None = Field(
        None, description="Profile file(s) or preset name(s) this profile builds on."
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
            for channel in env.channels:
                if ANACONDA_CHANNELS.match(channel):
                    raise ValueError(
                        f"environments: '{env.name}' uses Anaconda's channel '{channel}', but "
                        "the miniforge installer keeps the image on conda-forge; use "
                        "conda-forge or a private mirror, or installer: miniconda"
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


@dataclass(frozen=True)
class _Document:
    path: Path
    raw: bytes
    root: yaml.Node
    data: dict


def _read_document(path: Path) -> _Document:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ProfileError(f"{path}: cannot read profile ({error.strerror})") from None
    try:
        text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8 text; save the profile as UTF-8") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ProfileError(f"{where}: not valid YAML ({problem}); fix the syntax") from None
    if data is None:
        raise ProfileError(f"{path}: profile is empty; start from profiles/demo.yaml")
    if not isinstance(data, dict):
        raise ProfileError(f"{path}:1: a profile is a mapping of keys (client, project, ...)")
    return _Document(path, raw, root, data)


def _parent_paths(document: _Document) -> list[Path]:
    extends = document.data.get("extends", [])
    names = [extends] if isinstance(extends, str) else extends
    line = _line_of(document.root, ("extends",))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProfileError(
            f"{document.path}:{line}: extends: give a file path or a preset name, or a list of them"
        )
    parents = []
    for name in names:
        if name.endswith((".yaml", ".yml")) or "/" in name:
            parent = (document.path.parent / name).resolve()
            if not parent.is_file():
                raise ProfileError(
                    f"{document.path}:{line}: extends: no file {parent}; "
                    "fix the path (it is relative to this profile)"
                )
        else:
            parent = PRESETS_DIR / f"{name}.yaml"
            if not re.match(r"^[a-z0-9-]+$", name) or not parent.is_file():
                known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
                raise ProfileError(
                    f"{document.path}:{line}: extends: no preset '{name}' (presets: {known})"
                )
        parents.append(parent)
    return parents


def _load_chain(path: Path, stack: tuple[Path, ...] = ()) -> list[_Document]:
    """The profile and everything it extends, most specific first."""
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(p.name for p in (*stack, path))
        raise ProfileError(f"{stack[-1]}: extends: cycle {cycle}; remove one of these extends")
    document = _read_document(path)
    chain = [document]
    for parent in _parent_paths(document):
        chain += _load_chain(parent, (*stack, path))
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


def _file_path(
    document: _Document, loc: tuple, value: object, suffix: str | tuple[str, ...]
) -> str:
    """A file named in the profile, made absolute from the folder of the file naming it."""
    line = _line_of(document.root, loc)
    where = f"{document.path}:{line}: {_field_path(loc)}"
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(f"{where}: give a file path")
    path = (document.path.parent / value).resolve()
    if not path.is_file():
        raise ProfileError(f"{where}: no file {path}; fix the path (relative to this file)")
    if not path.name.endswith(suffix):
        kinds = " or ".join([suffix] if isinstance(suffix, str) else suffix)
        raise ProfileError(f"{where}: {path.name} is not a {kinds} file")
    return str(path)


def _imported_environment(document: _Document, index: int, env: dict) -> dict:
    """An environment with its environment.yml merged in (the profile's own keys win)."""
    loc = ("environments", index, "environment_file")
    path = _file_path(document, loc, env["environment_file"], (".yml", ".yaml"))
    where = f"{document.path}:{_line_of(document.root, loc)}: {_field_path(loc)}"
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ProfileError(f"{where}: {path} is not valid YAML; fix or re-export it") from None
    deps = spec.get("dependencies") if isinstance(spec, dict) else None
    if not isinstance(deps, list):
        raise ProfileError(f"{where}: {path} has no 'dependencies' list (conda env export)")
    conda = [d for d in deps if isinstance(d, str)]
    pip = [p for d in deps if isinstance(d, dict) for p in d.get("pip", [])]
    python = next(
        (m.group(1) for d in conda if (m := re.match(r"^python\s*=+\s*(3\.\d+)", d))), None
    )
    channels = [
        str((Path(path).parent / c).resolve())
        if isinstance(c, str) and c.startswith((".", "/"))
        else c
        for c in spec.get("channels") or []
    ]
    imported = {
        "name": spec.get("name"),
        "channels": channels,
        "conda": conda,
        "pip": pip,
        "python": python,
    }
    merged = {k: v for k, v in imported.items() if v} | env
    return {**merged, "environment_file": path}


def _absolute_paths(document: _Document) -> dict:
    """The document's data with its file paths (notebooks, TLS files) made absolute."""
    data = dict(document.data)
    notebooks = data.get("notebooks")
    if isinstance(notebooks, list):
        data["notebooks"] = [
            _file_path(document, ("notebooks", i), n, ".ipynb") for i, n in enumerate(notebooks)
        ]
    envs = data.get("environments")
    if isinstance(envs, list):
        data["environments"] = [
            _imported_environment(document, i, env)
            if isinstance(env, dict) and "environment_file" in env
            else env
            for i, env in enumerate(envs)
        ]
    tls = (data.get("jupyter") or {}).get("tls") if isinstance(data.get("jupyter"), dict) else None
    if isinstance(tls, dict):
        resolved = {
            key: _file_path(document, ("jupyter", "tls", key), tls[key], "")
            for key in ("certificate", "key")
            if key in tls
        }
        data["jupyter"] = {**data["jupyter"], "tls": {**tls, **resolved}}
    return data


def load_profile(path: Path | str) -> LoadedProfile:
    """Read and validate a profile (and what it extends), raising ProfileError with one line
    on any problem."""
    chain = _load_chain(Path(path))
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
        named = re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", detail)
        if named and [str(p) for p in loc] == named.group(1).split(".")[: len(loc)]:
            loc, detail = tuple(named.group(1).split(".")), named.group(2)
        source = next((d for d in chain if _walk(d.root, loc)[1]), chain[0])
        line = _line_of(source.root, loc)
        where = f"{source.path}:{line}" if line else str(source.path)
        raise ProfileError(f"{where}: {_field_path(loc)}: {detail}") from None
    digest = hashlib.sha256(b"".join(d.raw for d in chain))
    for notebook in profile.notebooks:
        digest.update(Path(notebook).read_bytes())
    return LoadedProfile(profile=profile, path=chain[0].path, sha256=digest.hexdigest())
