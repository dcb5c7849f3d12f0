"""`factory cache ls` and `factory cache prune`: the layer store (factory.layers) and where
the cache's disk goes."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import click

from factory import cache as cache_layout
from factory.errors import FactoryError
from factory.layers import (
    CACHE_MAX_ENV_VAR,
    DEFAULT_CACHE_MAX,
    LayerStore,
    SizeError,
    cache_max_bytes,
    parse_size,
)
from factory.tables import format_table, human_age, human_bytes


@click.group()
def cache() -> None:
    """The build cache: list its layers and sizes, or prune them."""


@cache.command("ls")
def list_layers() -> None:
    """List the stored layers (most recently used first) and each cache folder's size."""
    store = LayerStore()
    entries = store.entries()
    now = time.time()
    rows = [
        (
            record["key"][:12],
            record["name"],
            human_bytes(record["bytes"]),
            human_age(now - record["last_used"]),
            ", ".join(record.get("profiles") or []) or "-",
        )
        for record in entries
    ]
    if rows:
        click.echo(format_table(("KEY", "LAYER", "SIZE", "LAST USED", "PROFILES"), rows))
    else:
        click.echo(f"no layers stored in {store.root}")
    total = sum(record["bytes"] for record in entries)
    click.echo(
        f"{_layers(len(entries))}, {human_bytes(total)}; `factory cache prune` keeps at most "
        f"{human_bytes(cache_max_bytes())} (${CACHE_MAX_ENV_VAR}, default {DEFAULT_CACHE_MAX})"
    )
    root = cache_layout.cache_dir()
    sizes = [(name, disk_usage(root / name)) for name in cache_layout.SUBFOLDERS]
    rows = [(f"{name}/", human_bytes(size)) for name, size in sizes]
    rows.append(("total", human_bytes(sum(size for _, size in sizes))))
    click.echo(f"\ncache folders in {root} (layers/ counts unfinished layers too):")
    click.echo(format_table(("FOLDER", "SIZE"), rows))


@cache.command()
@click.option(
    "--max",
    "max_size",
    metavar="SIZE",
    help=f"Evict least recently used layers until the store holds at most SIZE (60G, 512M or "
    f"bytes; 0 empties it). Default: ${CACHE_MAX_ENV_VAR}, else {DEFAULT_CACHE_MAX}.",
)
def prune(max_size: str | None) -> None:
    """Evict the least recently used layers (with the layers built on them) until the store
    fits its limit; layers being built are kept."""
    if max_size is None:
        limit = cache_max_bytes()
    else:
        try:
            limit = parse_size(max_size)
        except SizeError:
            raise FactoryError(
                f"--max: {max_size!r} is not a size; write it as 60G, 512M or a number of "
                "bytes (0 empties the layer store)"
            ) from None
    store = LayerStore()
    now = time.time()
    removed = store.prune(limit)
    for record in removed:
        click.echo(
            f"removed {record['key'][:12]} {record['name']} ({human_bytes(record['bytes'])}, "
            f"last used {human_age(now - record['last_used'])})"
        )
    left = store.entries()
    held = sum(record["bytes"] for record in left)
    click.echo(
        f"freed {human_bytes(sum(r['bytes'] for r in removed))}; {_layers(len(left))} "
        f"({human_bytes(held)}) left, limit {human_bytes(limit)}"
    )
    if held > limit:
        click.echo("the layers left over the limit are in use by a running build; prune later")


def _layers(count: int) -> str:
    return f"{count} layer{'' if count == 1 else 's'}"


def disk_usage(folder: Path) -> int:
    """Bytes on disk under `folder`, links not followed (0 when it does not exist)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we walk
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total
