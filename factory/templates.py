"""The one Jinja environment: the OVF descriptor, the Vagrantfile, the HTML report and the
Packer template are all rendered here."""

from __future__ import annotations

import functools

import jinja2

from factory.resources import PACKER_DIR, TEMPLATES_DIR

# Markup languages are escaped; HCL, Ruby and shell are not (their values are escaped by
# factory.escape before they reach a template).
_ESCAPED_SUFFIXES = (".xml", ".html")


def _autoescape(name: str | None) -> bool:
    return bool(name) and name.removesuffix(".j2").endswith(_ESCAPED_SUFFIXES)


@functools.cache
def environment() -> jinja2.Environment:
    """Strict about undefined values (a typo fails the render) and keeps a template's last
    newline, so rendered files end as their templates do."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([TEMPLATES_DIR, PACKER_DIR]),
        autoescape=_autoescape,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render_template(name: str, **values: object) -> str:
    """Render the template `name` (e.g. "ovf.xml.j2", "image.pkr.hcl.j2") with `values`."""
    return environment().get_template(name).render(**values)
