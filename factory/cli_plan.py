"""`factory plan`: the build plan a scheduler runs, one build-and-validate job per profile
(factory/plan.py; docs/scheduling.md)."""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli_options import outputs_option
from factory.plan_formats import FORMATS


@click.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--format",
    "plan_format",
    type=click.Choice(FORMATS),
    default="json",
    show_default=True,
    help="json: the plan's data; the others: a file that scheduler runs as it is.",
)
@outputs_option
@click.option(
    "-o",
    "--output",
    "output_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the plan to this file instead of standard output.",
)
@click.option(
    "--only",
    help="Each job validates only these groups of checks (comma-separated, as `factory "
    "validate --only`), e.g. a quick plan for every change; a delivery validated with fewer "
    "groups is not skipped as current. Default: every group.",
)
def plan(
    profiles: tuple[Path, ...],
    plan_format: str,
    outputs: Path,
    output_file: Path | None,
    only: str | None,
):
    """Plan one job per profile, each building then validating it, for GitHub Actions,
    GitLab CI, Argo Workflows or Slurm: what each job needs (KVM, GPU, memory, disk), its
    commands, and which of its layers the cache holds. Builds nothing."""
    from factory.files import write_text_atomically
    from factory.plan import plan_profiles
    from factory.plan_formats import render_plan
    from factory.validate.suites import parse_groups, partial

    data = plan_profiles(list(profiles), outputs, plan_format, partial(parse_groups(only)))
    text = render_plan(data, plan_format)
    if output_file is None:
        click.echo(text, nl=False)
        return
    write_text_atomically(output_file, text)
    cached = sum(job["cached"] for job in data["jobs"])
    click.echo(
        f"{plan_format} plan of {len(data['jobs'])} job(s), {cached} fully cached: {output_file}"
    )
