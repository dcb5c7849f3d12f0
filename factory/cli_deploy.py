"""`factory deploy`: boot a delivery on this host's libvirt, or remove it again."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("delivery", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "target",
    required=True,
    metavar="libvirt[:URI]",
    help="Where to deploy: libvirt on this host (URI default qemu:///system). vSphere and "
    "Proxmox import the OVA with the commands in the delivery's handover.html.",
)
@click.option("--name", help="The domain's name (default: the delivery's name).")
@click.option("--destroy", is_flag=True, help="Stop and undefine the domain, remove its disk.")
@click.option(
    "--accelerator", default="auto", show_default=True, type=click.Choice(["auto", "kvm", "tcg"])
)
@click.option(
    "--timeout",
    default=900,
    show_default=True,
    type=click.IntRange(min=30),
    help="Seconds to wait for the machine to boot (under TCG it takes minutes).",
)
def deploy(
    delivery: Path, target: str, name: str | None, destroy: bool, accelerator: str, timeout: int
) -> None:
    """Boot DELIVERY (outputs/<name>) as a libvirt domain on a copy of its qcow2, and print
    its address, SSH host key fingerprints and how to log in. docs/deploy.md"""
    from factory.deploy import deploy_to_libvirt, destroy_on_libvirt, key_fingerprint, libvirt_uri

    uri = libvirt_uri(target)
    if destroy:
        gone = destroy_on_libvirt(delivery, uri, name)
        click.echo(f"destroyed {gone.name} at {uri}; removed {gone.disk} and {gone.console}")
        return
    done = deploy_to_libvirt(delivery, uri, name, accelerator, timeout, log=_progress)
    address = done.address
    click.echo(f"deployed {done.deployment.name} at {uri} in {done.seconds:.0f} s "
               f"({done.description})")  # fmt: skip
    click.echo(f"address:   {address}")
    click.echo("host keys: (compare them with what ssh shows on the first login)")
    for key in done.host_keys:
        click.echo(f"  {key.split()[0]} {key_fingerprint(key)}")
    click.echo(f"log in:    ssh {done.admin_user}@{address}")
    if done.jupyter:
        click.echo(f"Jupyter:   https://{address}/ (token: ssh {done.admin_user}@{address} "
                   "cat jupyter-token)")  # fmt: skip
    click.echo(f"console:   {done.deployment.console}")
    remove = f"factory deploy {delivery} --to libvirt:{uri} --name {done.deployment.name} --destroy"
    click.echo(f"remove:    {remove}")


def _progress(line: str) -> None:
    click.echo(line, err=True)
