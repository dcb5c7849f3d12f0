"""The options several `factory` commands share, and the help layout in pipeline order."""

from __future__ import annotations

from pathlib import Path

import click

DEFAULT_OUTPUTS = Path("outputs")
outputs_option = click.option(
    "--outputs",
    type=click.Path(path_type=Path),
    default=DEFAULT_OUTPUTS,
    envvar="FACTORY_OUTPUTS",
    show_default=True,
    help="Folder that receives the deliveries.",
)


EXPORT_FORMATS = ("ova", "vagrant-libvirt", "vagrant-virtualbox", "oci")
ova_digest_option = click.option(
    "--ova-digest",
    type=click.Choice(["sha1", "sha256"]),
    help="OVA flavour: sha1 = OVF 1.0 with a SHA1 manifest (the default; every importer reads "
    "it); sha256 = OVF 2.0 with a SHA256 manifest (not read by Proxmox or older vSphere). A "
    "profile with signing.key always gets OVF 1.0 with a SHA256 manifest and certificate.",
)
box_url_option = click.option(
    "--box-url",
    help="URL the box folder will be published at, written into the box catalog "
    "(default: the folder's file:// URL).",
)


def format_option(default: str):
    return click.option(
        "--format",
        "formats",
        default=default,
        show_default=True,
        help="Comma-separated artifacts: " + ", ".join(EXPORT_FORMATS) + ".",
    )


PIPELINE_COMMANDS = (
    "lock",
    "bundle",
    "base",
    "render",
    "build",
    "export",
    "validate",
    "deploy",
)
TOOL_COMMANDS = (
    "cache",
    "credentials",
    "diff",
    "doctor",
    "keygen",
    "new",
    "plan",
    "release",
    "schema",
    "verify",
)


class PipelineGroup(click.Group):
    """Lists the commands as the pipeline runs them, then the tools."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*PIPELINE_COMMANDS, *TOOL_COMMANDS]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, names in (("Pipeline, in order", PIPELINE_COMMANDS), ("Tools", TOOL_COMMANDS)):
            rows = [(n, self.commands[n].get_short_help_str(formatter.width)) for n in names]
            with formatter.section(title):
                formatter.write_dl(rows)
