"""The `factory` command line: a thin layer over the pipeline (pipeline.py).

`factory --help` lists the pipeline's commands in the order they run, then the tools.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import click

from factory import __version__
from factory.cache import set_cache_dir
from factory.cli_build import build
from factory.cli_cache import cache
from factory.cli_deploy import deploy
from factory.cli_lifecycle import diff, new, release
from factory.cli_options import (
    EXPORT_FORMATS,
    PipelineGroup,
    box_url_option,
    format_option,
    outputs_option,
    ova_digest_option,
)
from factory.cli_plan import plan
from factory.cli_verify import keygen, verify
from factory.errors import ExitCode, FactoryError, ValidationFailed
from factory.processes import Terminated, signals_as_exceptions

_debug = False


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.group(
    cls=PipelineGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="profile -> lock -> installer -> base -> render -> bundle -> layers (system, conda, "
    "env ..., client) -> export -> validate",
)
@click.version_option(__version__, prog_name="factory")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    envvar="FACTORY_CACHE_DIR",
    help="Cache for base images and packages (default ~/.cache/factory).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option(
    "--allow-root",
    "allow_roots",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A folder besides the profile's own that profiles may read files from (repeatable; "
    "adds to $FACTORY_ALLOWED_ROOTS).",
)
def cli(cache_dir: Path | None, debug: bool, allow_roots: tuple[Path, ...]) -> None:
    """Turn a client profile into a built, exported and validated AI virtual machine."""
    global _debug
    _debug = debug
    set_cache_dir(cache_dir)
    if allow_roots:
        from factory.profile import ALLOWED_ROOTS_ENV_VAR

        listed = [os.environ.get(ALLOWED_ROOTS_ENV_VAR, ""), *map(str, allow_roots)]
        os.environ[ALLOWED_ROOTS_ENV_VAR] = os.pathsep.join(p for p in listed if p)


@cli.command()
@click.option("--refresh", is_flag=True, help="Probe KVM again instead of using the cache.")
def doctor(refresh: bool) -> None:
    """Say what this host has and lacks for a build."""
    from factory.doctor import check_host
    from factory.kvm import kvm_boots

    if refresh:
        kvm_boots(refresh=True)
    checks = check_host()
    for check in checks:
        mark = "ok " if check.ok else ("MISSING" if check.required else "no ")
        click.echo(f"{mark:8} {check.name:28} {check.detail}")
        if not check.ok and check.fix:
            click.echo(f"{'':8} fix: {check.fix}")
    if any(c.required and not c.ok for c in checks):
        raise FactoryError("this host cannot build images yet; run the fixes above")


cli.add_command(build)
cli.add_command(cache)
cli.add_command(deploy)
cli.add_command(diff)
cli.add_command(new)
cli.add_command(plan)
cli.add_command(release)
cli.add_command(keygen)
cli.add_command(verify)


@cli.command()
def schema() -> None:
    """Print the profile's JSON schema (for editors; docs/profile.schema.json)."""
    from factory.profile.docs import schema_text

    click.echo(schema_text(), nl=False)


@cli.group()
def base() -> None:
    """Base OS images (stage: base OS)."""


@base.command("build")
@click.argument("release", default="debian-12")
@click.option("--rebuild", is_flag=True, help="Build again even if cached.")
def base_build(release: str, rebuild: bool) -> None:
    """Build (or reuse) a cloud-init-ready base qcow2 from Debian's mirror."""
    from factory.base import debian_base_image
    from factory.progress import plain_log

    path = debian_base_image(release, log=plain_log, rebuild=rebuild)
    click.echo(str(path))


@cli.command()
@click.argument("profile", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Solve even when the inputs did not change.")
@click.option(
    "--check",
    is_flag=True,
    help="Solve nothing: exit 1 when a lock is missing or no longer matches the profile.",
)
def lock(profile: Path, force: bool, check: bool) -> None:
    """Solve every environment on the host and write lock files next to the profile."""
    from factory.profile import load_profile
    from factory.progress import plain_log
    from factory.resolve import lock_dir_for, lock_profile, stale_locks

    loaded = load_profile(profile)
    started = time.monotonic()
    if check:
        stale = stale_locks(loaded)
        if stale:
            raise FactoryError(
                f"{lock_dir_for(loaded)}: the lock of {', '.join(stale)} no longer matches "
                f"{loaded.path.name}; run `factory lock {profile}`"
            )
        click.echo(f"locks in {lock_dir_for(loaded)} match {loaded.path.name}")
        return
    locks = lock_profile(loaded, force=force, log=plain_log)
    for lock_ in locks.values():
        click.echo(f"{lock_.name}: {len(lock_.conda)} conda + {len(lock_.pip)} pip packages")
    click.echo(f"locks in {lock_dir_for(loaded)} ({time.monotonic() - started:.1f} s)")


@cli.command()
@click.argument("profile", type=click.Path(path_type=Path))
@outputs_option
def bundle(profile: Path, outputs: Path) -> None:
    """Lock, then download every locked package into outputs/bundles/<name>: an indexed
    private conda channel, a pip wheelhouse and SHA256SUMS, for air-gapped builds."""
    from factory.bundle import build_payload
    from factory.files import replace_path, staging_dir
    from factory.profile import load_profile
    from factory.progress import plain_log
    from factory.resolve import lock_profile

    loaded = load_profile(profile)
    started = time.monotonic()
    locks = lock_profile(loaded, log=plain_log)
    target = outputs / "bundles" / loaded.name
    with staging_dir(target.parent) as scratch:
        build_payload(locks, scratch / "bundle", log=plain_log)
        replace_path(scratch / "bundle", target)
    files = sum(1 for p in target.rglob("*") if p.is_file())
    click.echo(f"bundle in {target}: {files} files ({time.monotonic() - started:.0f} s)")


@cli.command()
@click.argument("profile", type=click.Path(path_type=Path))
@outputs_option
@click.option(
    "--into",
    type=click.Path(path_type=Path),
    help="Folder to render into (default: <outputs>/renders/<name>); it is replaced.",
)
@click.option(
    "--builder",
    type=click.Choice(["qemu", "vsphere-clone", "proxmox-clone"]),
    default="qemu",
    show_default=True,
    help="Where Packer builds: QEMU here, or a client's vSphere or Proxmox cluster (the whole "
    "build, connection from PKR_VAR_* only; docs/remote-builders.md).",
)
def render(profile: Path, outputs: Path, into: Path | None, builder: str) -> None:
    """Render the Packer build folder to outputs/renders/<name> and validate it. The
    client's TLS files are left out; a delivery is never touched."""
    from factory.pipeline import render_for_review
    from factory.profile import load_profile

    target = render_for_review(load_profile(profile), outputs, into, builder)
    click.echo(f"rendered and validated {target}")
    if builder != "qemu":
        click.echo(f"build it there: cd {target} && packer build -var-file=image.pkrvars.hcl "
                   "image.pkr.hcl (docs/remote-builders.md)")  # fmt: skip


@cli.command("export")
@click.argument("delivery", type=click.Path(path_type=Path))
@format_option("ova")
@ova_digest_option
@click.option(
    "--boxes",
    "box_root",
    type=click.Path(path_type=Path),
    help="Folder that receives <client>_<project>/ with the boxes and their catalog "
    "(default: boxes/ beside the delivery).",
)
@box_url_option
def export_command(
    delivery: Path,
    formats: str,
    ova_digest: str | None,
    box_root: Path | None,
    box_url: str | None,
) -> None:
    """Write a delivery's OVA, Vagrant boxes or container image (again) from its qcow2."""
    from factory.boxes import BOX_FORMATS, parse_formats
    from factory.delivery import reexport
    from factory.progress import Progress

    chosen = parse_formats(formats, EXPORT_FORMATS)
    if "oci" in chosen:
        from factory.oci import check_tools, export_oci

        check_tools()
    with Progress() as progress:
        written = reexport(
            delivery,
            ova="ova" in chosen,
            ova_digest=ova_digest,
            box_formats=[f for f in chosen if f in BOX_FORMATS],
            box_root=box_root,
            box_url=box_url,
            progress=progress,
        )
        if "oci" in chosen:  # after the OVA: SHA256SUMS then lists both
            progress.set_stage("oci")
            written += export_oci(delivery, log=progress.log)
    for path in written:
        click.echo(f"exported {path}")
    if (delivery / "handover.html").is_file():
        from factory.dossier import write_dossier

        click.echo(f"handover: {write_dossier(delivery)}")


@cli.command()
@click.argument("delivery", required=False, type=click.Path(path_type=Path))
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(path_type=Path),
    help="Check against this profile instead of the delivery's own copy.",
)
@click.option(
    "--host",
    "address",
    help="Validate a live machine instead: user@address[:port] over SSH, or 'local' for "
    "the machine this runs on.",
)
@click.option("--identity", type=click.Path(path_type=Path), help="SSH key for --host.")
@click.option(
    "--report-dir",
    type=click.Path(path_type=Path),
    help="Where to write the reports (default: the delivery folder).",
)
@click.option(
    "--accelerator", default="auto", show_default=True, type=click.Choice(["auto", "kvm", "tcg"])
)
@click.option(
    "--only",
    help="Run only these groups of checks, comma-separated (e.g. gpu,env). Default: all of them.",
)
@click.option(
    "--container",
    is_flag=True,
    help="Check the delivery's container image (NAME.oci.tar, from `factory export --format "
    "oci`) in podman instead of booting the OVA; reports go to DELIVERY/container-validation/.",
)
def validate(
    delivery: Path | None,
    profile_path: Path | None,
    address: str | None,
    identity: Path | None,
    report_dir: Path | None,
    accelerator: str,
    only: str | None,
    container: bool,
) -> None:
    """Boot the delivered OVA (or reach --host) and check what the profile promises. With
    --host and DELIVERY, the live machine is checked against that delivery: its profile, its
    locks, and its SBOM (packages added, removed or changed since, listeners not delivered)."""
    from factory.progress import plain_log
    from factory.validate import validate_delivery, validate_host
    from factory.validate.suites import parse_groups

    started = time.monotonic()
    groups = parse_groups(only)
    if container and (address or delivery is None):
        raise click.UsageError(
            "--container checks a delivery's container image: give the delivery folder "
            "(outputs/<name>) and leave out --host"
        )
    if container:
        from factory.validate.container import validate_container

        assert delivery is not None
        outcome = validate_container(
            delivery, profile_path=profile_path, report_dir=report_dir, log=plain_log, only=groups
        )
    elif address:
        if profile_path is None and delivery is not None:
            profile_path = delivery / "profile.yaml"
        if profile_path is None:
            raise FactoryError(
                "--host needs the delivery it was made from (DELIVERY) or --profile: the checks "
                "come from the profile"
            )
        outcome = validate_host(
            address,
            profile_path=profile_path,
            delivery=delivery,
            key_file=identity,
            report_dir=report_dir or Path("."),
            log=plain_log,
            only=groups,
        )
    else:
        if delivery is None:
            raise FactoryError("give the delivery folder (outputs/<name>) or --host")
        outcome = validate_delivery(
            delivery,
            profile_path=profile_path,
            accelerator=accelerator,
            report_dir=report_dir,
            log=plain_log,
            only=groups,
        )
    for result in outcome.results:
        click.echo(f"{result.status.upper():8} {result.name}: {result.detail}")
    click.echo("reports: " + ", ".join(str(p) for p in outcome.reports))
    if not address and not container and report_dir is None:
        from factory.dossier import write_dossier

        click.echo(f"handover: {write_dossier(delivery)}")
    spent = time.monotonic() - started
    if outcome.failed:
        names = "; ".join(r.name for r in outcome.failed)
        raise ValidationFailed(f"validation failed ({len(outcome.failed)} check(s)): {names}")
    skipped = sum(r.status == "skipped" for r in outcome.results)
    passed = len(outcome.results) - skipped
    note = f" ({skipped} skipped, each with its reason above)" if skipped else ""
    click.echo(f"validated: all {passed} checks passed{note} in {spent:.0f} s")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
def credentials(source: Path) -> None:
    """How IT reads the first-boot secrets of a profile or delivery (outputs/<name>)."""
    from factory.delivery import Delivery
    from factory.handover import credentials_text
    from factory.profile import load_profile

    profile = Delivery(source, source.name).profile if source.is_dir() else source
    click.echo(credentials_text(load_profile(profile)), nl=False)


def main() -> None:
    """Entry point. Exits with os._exit so that native solver threads cannot abort the
    interpreter's shutdown after an error."""
    code = 0
    try:
        _run()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a closed pipe or terminal
            stream.flush()
    os._exit(code)


def _run() -> None:
    # Also when started in the background, where SIGINT arrives ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with signals_as_exceptions():
            cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _err("interrupted; nothing was published")
        sys.exit(ExitCode.INTERRUPTED)
    except click.BadParameter as error:  # one line: the option, the value, what it accepts
        _err(f"error: {error.format_message()}")
        sys.exit(error.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except FactoryError as error:
        if _debug:
            traceback.print_exc()
        _err(f"error: {error}")
        details = getattr(error, "details", None)
        if details:
            _err(details)
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, Terminated):
        _err("interrupted; nothing was published")
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as error:  # a bug: say so in one line; --debug shows the traceback
        if _debug:
            traceback.print_exc()
        _err(f"internal error: {type(error).__name__}: {error} (rerun with --debug and report it)")
        sys.exit(ExitCode.FAILED)
