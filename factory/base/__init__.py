"""The base OS stage: a locally built Debian qcow2 (debian.py, from the recipe in recipe.py),
or a downloaded cloud image (cloud.py), both cached."""

from factory.base.cloud import cloud_base_image
from factory.base.debian import DEBIAN_RELEASES, RECIPE_VERSION, debian_base_image
from factory.base.mounts import remove_unless_mounted
from factory.base.recipe import (
    COMPONENTS,
    DEBIAN_PACKAGES,
    DISK_SIZE_GIB,
    KERNEL_CMDLINE,
    chroot_command,
    clear_apt_lists,
)

# Temporary re-exports under their old private names, for factory/assemble.py.
from factory.base.recipe import grub_cfg as _grub_cfg
from factory.base.recipe import teardown as _teardown
from factory.processes import LoggedRunner as _Runner
from factory.processes import signals_deferred as _signals_deferred

__all__ = [
    "COMPONENTS",
    "DEBIAN_PACKAGES",
    "DEBIAN_RELEASES",
    "DISK_SIZE_GIB",
    "KERNEL_CMDLINE",
    "RECIPE_VERSION",
    "_Runner",
    "_grub_cfg",
    "_signals_deferred",
    "_teardown",
    "chroot_command",
    "clear_apt_lists",
    "cloud_base_image",
    "debian_base_image",
    "remove_unless_mounted",
]
