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

__all__ = [
    "COMPONENTS",
    "DEBIAN_PACKAGES",
    "DEBIAN_RELEASES",
    "DISK_SIZE_GIB",
    "KERNEL_CMDLINE",
    "RECIPE_VERSION",
    "chroot_command",
    "clear_apt_lists",
    "cloud_base_image",
    "debian_base_image",
    "remove_unless_mounted",
]
