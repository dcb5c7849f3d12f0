"""The profile sections for what runs on the delivered machine besides Jupyter: the client's
own services and the environment snapshots."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from factory.profile.sections import Strict

SERVICE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
ENV_VAR = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
# Ports the image itself uses: SSH, nginx, the node exporter, Prometheus.
IMAGE_PORTS = {22, 80, 443, 9090, 9100}


class Service(Strict):
    """The client's own service: a command in one of the environments, run by systemd under
    its own user, reachable only through nginx at https://HOST/<name>/."""

    name: str = Field(description="Service name: the unit, the user svc-<name> and the URL path.")
    environment: str = Field(description="The environment whose bin/ the command runs from.")
    command: list[str] = Field(
        min_length=1,
        description="The command and its arguments; a bare program name is taken from the "
        "environment's bin/. It runs in the service's folder, where its files are, and must "
        "listen on 127.0.0.1:<port> (the environment variable PORT says which).",
    )
    port: int = Field(ge=1024, le=65535, description="Port the service binds on 127.0.0.1.")
    health: str = Field(
        "/health", description="Path, below the service's URL, that answers 200 when it is well."
    )
    files: list[str] = Field(
        default_factory=list,
        description="Files the service runs (relative to the file that names them), copied "
        "into its folder /srv/services/<name>.",
    )
    environment_variables: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the service."
    )
    secrets: list[str] = Field(
        default_factory=list,
        description="Environment variables given a random value on the image's first boot "
        "(as the Jupyter token is); never in the image, readable by root and the service only.",
    )

    @field_validator("name")
    @classmethod
    def _service_name(cls, value: str) -> str:
        if not SERVICE_NAME.match(value):
            raise ValueError("must start with a letter and use only a-z, 0-9 and '-' (max 31)")
        return value

    @field_validator("command")
    @classmethod
    def _command_words(cls, words: list[str]) -> list[str]:
        for word in words:
            if not word or any(c in word for c in "\n\r\0"):
                raise ValueError("each word must be non-empty text on one line")
        return words

    @field_validator("health")
    @classmethod
    def _health_path(cls, value: str) -> str:
        if not re.match(r"^/[A-Za-z0-9._~/-]*$", value):
            raise ValueError("must be a URL path such as '/health'")
        return value

    @field_validator("environment_variables")
    @classmethod
    def _variables(cls, variables: dict[str, str]) -> dict[str, str]:
        for name, value in variables.items():
            if not ENV_VAR.match(name):
                raise ValueError(f"'{name}' is not a variable name such as 'MODEL_FILE'")
            if any(c in str(value) for c in '\n\r\0"\\'):
                raise ValueError(f"{name}: the value must be one line without '\"' or '\\'")
        return {name: str(value) for name, value in variables.items()}

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not ENV_VAR.match(name):
                raise ValueError(f"'{name}' is not a variable name such as 'API_KEY'")
        return names

    @field_validator("port")
    @classmethod
    def _free_port(cls, value: int) -> int:
        if value in IMAGE_PORTS:
            raise ValueError(f"{value} is used by the image itself; choose another port")
        return value

    @model_validator(mode="after")
    def _plain_or_secret(self) -> Service:
        clash = {"PORT", *self.environment_variables} & set(self.secrets)
        if clash:
            raise ValueError(f"secrets: {sorted(clash)[0]} is also set as a plain variable")
        return self

    @property
    def user(self) -> str:
        return f"svc-{self.name}"


class Snapshots(Strict):
    """Scheduled snapshots of every environment and of the user-facing configuration, with a
    rollback: `factory-env rollback ENV SNAPSHOT`."""

    every: Literal["hourly", "daily", "weekly"] = Field(
        "daily", description="How often a snapshot is taken (a systemd timer)."
    )
    keep: int = Field(14, ge=1, le=1000, description="How many snapshots are kept.")
