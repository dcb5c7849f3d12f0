"""`factory keygen` (the delivery team's signing key) and `factory verify` (a delivery's
checksums and signatures, checked offline)."""

from __future__ import annotations

from pathlib import Path

import click

from factory.errors import FactoryError, OptionError


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--name",
    default="Delivery team",
    show_default=True,
    help="The signer's name in the certificate: vCenter shows it, and the OVA's Vendor "
    "defaults to it.",
)
def keygen(path: Path, name: str) -> None:
    """Make a signing key (PATH, mode 0600) and its certificate (PATH ending in .crt)."""
    from factory.signing import CERTIFICATE_DAYS, fingerprint, generate_key, load_signer

    key_path, cert_path = generate_key(path, name)
    signer = load_signer(key_path)
    click.echo(f"wrote {key_path} (the private key: keep it out of git and deliveries)")
    click.echo(
        f"wrote {cert_path} ({name!r}, valid {CERTIFICATE_DAYS} days, sha256 fingerprint "
        f"{fingerprint(signer.certificate)})"
    )
    click.echo(f"sign deliveries with it: add to the profile\n  signing:\n    key: {key_path}")


@click.command()
@click.argument("delivery", type=click.Path(path_type=Path))
@click.option(
    "--certificate",
    "trusted_file",
    type=click.Path(path_type=Path),
    help="The signer's certificate as the delivery team gave it; without it the delivery's "
    "own signer.crt is used, and its fingerprint is printed to compare.",
)
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(path_type=Path),
    help="Also check the delivery is current for this profile: built from the layers it "
    "makes now, and validated as this OVA (a scheduler's rerun skips it then).",
)
@click.option(
    "--only",
    help="With --profile: the groups of checks (comma-separated, as `factory validate --only`) "
    "its validation must have run. Default: all of them.",
)
def verify(
    delivery: Path, trusted_file: Path | None, profile_path: Path | None, only: str | None
) -> None:
    """Check a delivery offline: SHA256SUMS, its signature, and the OVA's manifest and
    signature."""
    from cryptography import x509

    from factory.verify import current_for, verify_delivery

    if not delivery.is_dir():
        raise FactoryError(f"{delivery} is not a folder; give a delivery folder (outputs/<name>)")
    trusted = None
    if trusted_file is not None:
        try:
            trusted = x509.load_pem_x509_certificate(trusted_file.read_bytes())
        except (OSError, ValueError) as error:
            raise FactoryError(
                f"--certificate {trusted_file}: not a readable PEM certificate ({error})"
            ) from None
    groups = None
    if only is not None:
        from factory.validate.suites import parse_groups

        if profile_path is None:
            raise OptionError("--only says what the validation must cover: give --profile too")
        groups = parse_groups(only)
    findings = verify_delivery(delivery, trusted)
    if profile_path is not None:
        findings += current_for(delivery, profile_path, groups)
    for finding in findings:
        click.echo(f"{'ok' if finding.ok else 'FAILED':8} {finding.name}: {finding.detail}")
    failed = list(dict.fromkeys(f.name for f in findings if not f.ok))
    if failed:
        raise FactoryError(f"{delivery}: verification failed for {', '.join(failed)}")
    click.echo(f"verified {delivery}: every file matches its checksum and signature")
    if profile_path is not None:
        click.echo(f"{delivery} is current for {profile_path}: a rerun has nothing to build")
