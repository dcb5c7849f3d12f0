"""`factory new`: a starting profile for a client's project, built on an industry preset, with
the answers only the client can give marked TODO. It loads as it is written, so the next
command (`factory lock`) works once the TODO lines are filled in."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path

from factory.errors import FactoryError
from factory.files import staging_dir
from factory.profile import load_profile
from factory.profile.paths import CHECKOUT_DIR, PRESETS_DIR
from factory.profile.sections import NAME_PART


@dataclass(frozen=True)
class Starter:
    """What a new profile of an industry starts with besides its preset: the delivered VM's
    size, the packages the preset's sample notebook imports, and any GPU section."""

    cpus: int
    memory: int
    disk: int
    pip: str
    gpu: str = ""


# The sizes and packages of the example profiles of each industry (profiles/).
STARTERS = {
    "banking": Starter(8, 32768, 40, "numpy, pandas, scikit-learn, xgboost-cpu, shap, matplotlib"),
    "healthcare": Starter(
        16,
        65536,
        80,
        'torch==2.3.1, "numpy<2"',
        gpu="""\
# PyPI's torch 2.3.1 is the CUDA 12.1 build; remove this section for a CPU-only image.
gpu:
  vendor: nvidia
  driver: "535"
  cuda: "12.1"
  frameworks:
    pytorch: "2.3"
""",
    ),
    "manufacturing": Starter(4, 16384, 24, "numpy, pandas, scikit-learn, statsmodels, matplotlib"),
}
INDUSTRIES = tuple(STARTERS)

# An ed25519 public key of zeros: it parses, and it lets nobody in until it is replaced.
PLACEHOLDER_KEY = "ssh-ed25519 " + "AAAAC3NzaC1lZDI1NTE5AAAAI" + "A" * 43 + " REPLACE-ME"

_TEMPLATE = string.Template("""\
${schema}# ${client} / ${project}, made by `factory new` from the `${industry}` preset:
${summary}
# Answer every line marked TODO before the first build.
extends: ${industry}
client: ${client}
project: ${project}
version: 1
# TODO: one line that says what this image is for (shown in the OVA).
description: TODO describe this image
base: debian-12
resources:
  # The delivered VM's hardware: size it for the client's host.
  cpus: ${cpus}
  memory: ${memory}
  disk: ${disk}
admin:
  user: admin
  ssh_keys:
    # TODO: the client IT team's public key(s), each one line of ~/.ssh/id_ed25519.pub.
    - ${key}
environments:
  - name: ${project}
    python: "3.11"
    # TODO: the client's conda mirror, or conda-forge if the build host reaches it.
    channels: [conda-forge]
    conda: [python=3.11, pip]
    # What the preset's sample notebook imports; add the project's own packages.
    pip: [${pip}]
${gpu}""")

NEXT_STEPS = (
    "answer the TODO lines in it: admin.ssh_keys (replace the REPLACE-ME key), description, "
    "the environment's channels and packages"
)


def preset_summary(industry: str) -> str:
    """The preset's own opening comment, which says what it sets."""
    lines = (PRESETS_DIR / f"{industry}.yaml").read_text().splitlines()
    comments = []
    for line in lines:
        if not line.startswith("#"):
            break
        comments.append(line.replace("# Preset: ", "# ", 1))
    return "\n".join(comments)


def starter_text(client: str, project: str, industry: str, folder: Path) -> str:
    """The starting profile of `client`/`project` in `industry`, to be written in `folder`."""
    starter = STARTERS[industry]
    schema = ""
    if CHECKOUT_DIR is not None and folder.resolve().is_relative_to(CHECKOUT_DIR):
        # Editors complete keys from the schema, as in the example profiles.
        reference = os.path.relpath(CHECKOUT_DIR / "docs" / "profile.schema.json", folder.resolve())
        schema = f"# yaml-language-server: $schema={reference}\n"
    return _TEMPLATE.substitute(
        schema=schema,
        client=client,
        project=project,
        industry=industry,
        summary=preset_summary(industry),
        cpus=starter.cpus,
        memory=starter.memory,
        disk=starter.disk,
        key=PLACEHOLDER_KEY,
        pip=starter.pip,
        gpu=starter.gpu,
    )


def new_profile(client: str, project: str, industry: str, folder: Path) -> Path:
    """Write folder/<client>_<project>_v1.yaml, checked to load; an existing file is kept."""
    for label, value in (("CLIENT", client), ("PROJECT", project)):
        if not NAME_PART.match(value):
            raise FactoryError(
                f"{label}: '{value}' must start with a letter and use only a-z, 0-9 and '-' "
                "(at most 31), e.g. acme or credit-risk"
            )
    if industry not in STARTERS:
        raise FactoryError(f"--industry: no starter for '{industry}'; use {', '.join(INDUSTRIES)}")
    target = folder / f"{client}_{project}_v1.yaml".replace("-", "_")
    if target.exists():
        raise FactoryError(f"{target} exists; edit it, or remove it first to start again")
    with staging_dir(folder) as scratch:
        draft = scratch / target.name
        draft.write_text(starter_text(client, project, industry, folder), encoding="utf-8")
        load_profile(draft)  # a starter that does not load is a bug, never the user's problem
        try:
            os.link(draft, target)  # never over a file made meanwhile
        except FileExistsError:
            raise FactoryError(
                f"{target} exists; edit it, or remove it first to start again"
            ) from None
    return target
