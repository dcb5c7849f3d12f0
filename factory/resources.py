"""Where the files factory reads at run time live.

The checkout keeps the image sources at the top (`packer/`, `provisioners/`); a wheel carries
them inside the package (pyproject maps them to `factory/packer` and `factory/provisioners`).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE_DIR.parent


def _shipped(name: str) -> Path:
    installed = PACKAGE_DIR / name
    return installed if installed.is_dir() else _CHECKOUT / name


PACKER_DIR = _shipped("packer")
PROVISIONERS_DIR = _shipped("provisioners")
TEMPLATES_DIR = PACKAGE_DIR / "templates"
