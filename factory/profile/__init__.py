"""Stage 1: a client profile (YAML) in, a validated `Profile` out.

`schema` holds the model, the single source of truth for the format; `load` reads a profile
and what it extends; `messages` turns every problem into one line,
`file:line: field.path: what is wrong (what to do)`; `docs` generates the reference docs and
the JSON schema from the model.
"""

from factory.profile.load import LoadedProfile, load_profile
from factory.profile.paths import ALLOWED_ROOTS_ENV_VAR
from factory.profile.schema import Profile
from factory.profile.sections import (
    BUILD_USER,
    ENV_NAME,
    Environment,
    package_name,
    spec_channel,
)

__all__ = [
    "ALLOWED_ROOTS_ENV_VAR",
    "BUILD_USER",
    "ENV_NAME",
    "Environment",
    "LoadedProfile",
    "Profile",
    "load_profile",
    "package_name",
    "spec_channel",
]
