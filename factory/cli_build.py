"""`factory build`: one profile in this process, several in parallel child processes
(factory.parallel), or --explain: which layers the cache holds, without building."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from factory import events
from factory.cli_options import (
    EXPORT_FORMATS,
    box_url_option,
    format_option,
    outputs_option,
    ova_digest_option,
)
from factory.errors import ExitCode, FactoryError
from factory.layers import LayerStatus
from factory.tables import format_table

if TYPE_CHECKING:
    from factory.pipeline import BuildOptions


@click.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(path_type=Path))
@outputs_option
@click.option(
    "--accelerator",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "kvm", "tcg"]),
    help="QEMU accelerator; auto uses KVM only where it really boots a guest.",
)
@click.option("--force", is_flag=True, help="Replace an existing delivery of this version.")
@click.option(
    "--locked",
    is_flag=True,
    help="Refuse to build when a lock is missing or stale instead of solving again (for CI "
    "and committed locks).",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=1),
    envvar="FACTORY_BUILD_TIME_LIMIT",
    help="Minutes `packer build` may run before it is stopped (default 240); each "
    "provisioner also stops after PKR_VAR_provisioner_timeout (default 90m).",
)
@ova_digest_option
@format_option("ova")
@box_url_option
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With several profiles: how many build at once, each in its own process logging to "
    "<outputs>/logs/<profile>.build.log.",
)
@click.option(
    "--explain",
    is_flag=True,
    help="Build nothing: say for each layer whether the cache holds it, and why not.",
)
@click.option(
    "--events",
    type=click.Choice(["json"]),
    help="Write one JSON line per stage start and end to standard output (the build's own "
    "lines go to standard error): cache hit or miss, seconds, and the error on failure.",
)
@click.pass_context
def build(
    ctx: click.Context,
    profiles: tuple[Path, ...],
    outputs: Path,
    accelerator: str,
    force: bool,
    locked: bool,
    time_limit: float | None,
    ova_digest: str | None,
    formats: str,
    box_url: str | None,
    jobs: int,
    explain: bool,
    events: str | None,
) -> None:
    """Pre-flight, lock, render, build the layers and export one or more profiles.

    Several profiles build side by side (see --jobs) and share the layers they have in common.
    """
    from factory.boxes import check_box_url, parse_formats

    if "oci" in parse_formats(formats, EXPORT_FORMATS):
        from factory.oci import check_tools

        check_tools()  # before hours of build, not after
    check_box_url(box_url)
    if events and not explain:
        from factory import events as event_stream

        event_stream.start()
    if explain or len(profiles) == 1:
        from factory.build import PACKER_TIME_LIMIT_MINUTES
        from factory.pipeline import BuildOptions

        options = BuildOptions(
            outputs=outputs,
            accelerator=accelerator,
            force=force,
            locked=locked,
            ova_digest=ova_digest,
            time_limit_minutes=time_limit or PACKER_TIME_LIMIT_MINUTES,
        )
        if explain:
            _explain(list(profiles), options)
        else:
            _build_one(profiles[0], options, formats, box_url)
    else:
        child_args = [
            *_flags(force=force, locked=locked),
            *_valued(outputs=outputs, accelerator=accelerator, ova_digest=ova_digest),
            *_valued(format=formats, time_limit=time_limit, box_url=box_url, events=events),
        ]
        root = ctx.find_root().params
        global_args = [
            *_flags(debug=root.get("debug", False)),
            *_valued(cache_dir=root.get("cache_dir")),
        ]
        _build_many(list(profiles), global_args, child_args, outputs, jobs)


def _flags(**flags: bool) -> list[str]:
    return ["--" + name.replace("_", "-") for name, on in flags.items() if on]


def _valued(**options: object) -> list[str]:
    found = [("--" + name.replace("_", "-"), v) for name, v in options.items() if v is not None]
    return [part for name, value in found for part in (name, str(value))]


def _build_one(profile: Path, options: BuildOptions, formats: str, box_url: str | None) -> None:
    from factory.boxes import BOX_FORMATS, parse_formats
    from factory.delivery import reexport
    from factory.parallel import built_line
    from factory.pipeline import build_image
    from factory.profile import load_profile
    from factory.progress import Progress

    # The OVA and the qcow2 are always written; --format adds the Vagrant boxes and the
    # container image.
    chosen = parse_formats(formats, EXPORT_FORMATS)
    boxes = [f for f in chosen if f in BOX_FORMATS]
    started, name = time.monotonic(), str(profile)
    try:
        loaded = load_profile(profile)
        name = loaded.name
        final = build_image(loaded, options)
        if boxes:
            with Progress() as progress:
                reexport(final, ova=False, box_formats=boxes, box_url=box_url, progress=progress)
        if "oci" in chosen:
            from factory.oci import export_oci

            with Progress() as progress:
                progress.set_stage("oci")
                export_oci(final, log=progress.log)
    except BaseException as error:
        _build_end(name, started, error=error)
        raise
    _build_end(name, started, delivery=final)
    click.echo(built_line(loaded.name, time.monotonic() - started, final), err=events.enabled())


def _build_end(
    name: str, started: float, delivery: Path | None = None, error: BaseException | None = None
) -> None:
    """The build-end event: how the build ended and the exit code it ends with."""
    if error is None:
        status, code, text = "ok", ExitCode.OK, None
    elif isinstance(error, FactoryError):
        status, code, text = "failed", error.exit_code, str(error)
    elif isinstance(error, Exception):
        status, code, text = "failed", ExitCode.FAILED, f"{type(error).__name__}: {error}"
    else:  # Ctrl-C, SIGTERM
        status, code, text = "interrupted", ExitCode.INTERRUPTED, "interrupted"
    seconds = round(time.monotonic() - started, 1)
    events.emit(
        "build-end", name, status=status, exit_code=int(code), seconds=seconds,
        delivery=str(delivery) if delivery else None, error=text,
    )  # fmt: skip


def _build_many(
    profiles: list[Path], global_args: list[str], child_args: list[str], outputs: Path, jobs: int
) -> None:
    from factory.parallel import Batch, build_jobs, format_summary

    batch = Batch(build_jobs(profiles, global_args, child_args, outputs / "logs"), jobs)
    try:
        batch.run()
    finally:
        click.echo(format_summary(batch.outcomes()), err=events.enabled())
    failed = [o for o in batch.outcomes() if o.result != "passed"]
    error = FactoryError(
        f"{len(failed)} of {len(profiles)} builds failed; each one's log is listed above"
    )
    # The failed builds' own code when they share one (all bad profiles, say), else 1.
    codes = {o.exit_code for o in failed}
    if len(codes) == 1 and codes != {None} and 0 < (only := codes.pop()) < 128:
        error.exit_code = only
    results = [
        {"profile": o.job.name, "result": o.result, "exit_code": o.exit_code,
         "seconds": round(o.seconds, 1), "delivery": o.delivery, "error": o.error or None}
        for o in batch.outcomes()
    ]  # fmt: skip
    code = error.exit_code if failed else ExitCode.OK
    events.emit("batch-end", None, exit_code=int(code), results=results)
    if failed:
        raise error


def _explain(profiles: list[Path], options: BuildOptions) -> None:
    from factory.pipeline import explain_build
    from factory.profile import load_profile

    for profile in profiles:
        statuses = explain_build(load_profile(profile), options)
        if len(profiles) > 1:
            click.echo(f"{profile}:")
        click.echo(format_explain(statuses))


def format_explain(statuses: list[LayerStatus]) -> str:
    """One row per layer, base first: name, short key, hit or miss, and why; then where a
    build would start."""
    rows = [(s.layer.name, s.layer.key[:12], "hit" if s.hit else "miss", s.why) for s in statuses]
    table = format_table(("LAYER", "KEY", "CACHE", "WHY"), rows)
    missing = [s for s in statuses if not s.hit]
    if not missing:
        return f"{table}\nevery layer is stored: a build reuses them all"
    return (
        f"{table}\n{len(statuses) - len(missing)} of {len(statuses)} layers stored; "
        f"a build starts at {missing[0].layer.name}"
    )
