"""The commands around a profile's life: `factory new` starts one, `factory diff` shows what
changed between two versions for the client's review, `factory release` makes the next one."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from factory.cli_options import outputs_option
from factory.errors import FactoryError

# As diff(1): 0 nothing differs, 1 something differs, 2 trouble.
DIFF_SAME, DIFF_DIFFERENT, DIFF_TROUBLE = 0, 1, 2


@click.command("diff")
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "markdown"]),
    default="text",
    show_default=True,
    help="Plain text, or Markdown tables for a change request.",
)
@click.option("--markdown", is_flag=True, help="Same as --format markdown.")
def diff(old: Path, new: Path, output_format: str, markdown: bool) -> None:
    """Show what changed between two profiles or deliveries.

    OLD and NEW are profiles (read with their committed locks) or delivery folders
    (outputs/<name>). Prints the packages of each environment, the Debian packages (when both
    deliveries have an SBOM) and the settings that differ. Exits 0 when nothing differs, 1 when
    something does, 2 on bad input."""
    from factory.diff import diff_paths, render_markdown, render_text

    try:
        changes = diff_paths(old, new)
    except FactoryError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(DIFF_TROUBLE)
    render = render_markdown if markdown or output_format == "markdown" else render_text
    click.echo(render(changes), nl=False)
    sys.exit(DIFF_SAME if changes.empty else DIFF_DIFFERENT)


@click.command("new")
@click.argument("client")
@click.argument("project")
@click.option(
    "--industry",
    required=True,
    type=click.Choice(["banking", "healthcare", "manufacturing"]),
    help="The preset the profile extends.",
)
@click.option(
    "--into",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("profiles"),
    show_default=True,
    help="Folder to write the profile into.",
)
def new(client: str, project: str, industry: str, into: Path) -> None:
    """Write a starting profile from an industry preset.

    The profile is CLIENT_PROJECT_v1.yaml in --into; its TODO lines mark what only the client
    can answer. An existing file is never overwritten."""
    from factory.starter import NEXT_STEPS, new_profile

    into.mkdir(parents=True, exist_ok=True)
    target = new_profile(client, project, industry, into)
    click.echo(f"wrote {target} (extends the {industry} preset)")
    click.echo(f"next: 1. {NEXT_STEPS}")
    click.echo(f"      2. factory lock {target}")
    click.echo(f"      3. factory build {target}")


@click.command("release")
@click.argument("profile", type=click.Path(path_type=Path))
@outputs_option
def release(profile: Path, outputs: Path) -> None:
    """Make the next version of a profile and lock it.

    `version: N` becomes N+1 (nothing else in the file changes), the locks are written as
    `factory lock` writes them, and both are staged in git. Refused when that version is
    delivered already in --outputs."""
    from factory.progress import plain_log
    from factory.release import release_profile

    done = release_profile(profile, outputs, log=plain_log)
    click.echo(f"{done.old_name} -> {done.new_name}: {profile}")
    for lock in done.locks.values():
        click.echo(f"{lock.name}: {len(lock.conda)} conda + {len(lock.pip)} pip packages")
    if done.staged:
        click.echo("staged in git: " + ", ".join(map(str, done.staged)))
    if done.ignored:
        click.echo("not staged, git ignores: " + ", ".join(map(str, done.ignored)))
    click.echo(f"next: factory build {profile}")
