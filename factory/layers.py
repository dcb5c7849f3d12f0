"""The layer store: each build step's result is a qcow2 overlay on the one before it, stored
under a key that chains its inputs to its parent's key.

    key = sha256(parent key, layer name, canonical inputs, LAYER_FORMAT)

A layer is found by its key, so a build reuses the longest stored prefix of its chain and
builds only what follows. Beside each image sits a readable manifest (`<key>.json`): the
layer's name, its inputs, its parent, who used it and when. `explain` compares a missing
layer with the last one of the same name to say which input changed.

    <cache>/layers/<key>.qcow2   the overlay; its backing file is the parent's image
    <cache>/layers/<key>.json    the manifest, written last: a layer without one is unfinished
    <cache>/layers/<key>.lock    held while the layer is built, so two builds make it once
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from factory import cache
from factory.errors import FactoryError, ToolError
from factory.files import file_lock, write_text_atomically

# Bump when what a layer holds changes for the same inputs (a new step, another layout).
LAYER_FORMAT = 1
CACHE_MAX_ENV_VAR = "FACTORY_CACHE_MAX"
DEFAULT_CACHE_MAX = "60G"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class Layer:
    """One link of a build's chain. `inputs` maps each input's name to its digest or value;
    a root layer (the base image) has an `image` already and no parent."""

    name: str
    inputs: dict[str, str]
    parent: Layer | None = None
    image: Path | None = None
    cacheable: bool = True
    key: str = field(init=False)

    def __post_init__(self) -> None:
        blob = json.dumps(
            {
                "format": LAYER_FORMAT,
                "parent": self.parent.key if self.parent else None,
                "name": self.name,
                "inputs": self.inputs,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        object.__setattr__(self, "key", hashlib.sha256(blob).hexdigest())


def digest_files(paths: list[Path], root: Path | None = None) -> str:
    """One sha256 over the names (relative to root) and contents of files, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = str(path.relative_to(root)) if root else path.name
        digest.update(name.encode() + b"\0" + cache.sha256_file(path).encode() + b"\0")
    return digest.hexdigest()


class SizeError(FactoryError, ValueError):
    """A size that parse_size cannot read (a ValueError, and one line for the CLI)."""


def parse_size(text: str) -> int:
    """'60G', '512M' or a number of bytes."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        size = int(float(value.removesuffix(unit)) * _UNITS[unit])
    except (ValueError, OverflowError):  # OverflowError: 'inf', '1e999'
        size = -1
    if size < 0:
        raise SizeError(f"{text!r} is not a size; write it as 60G, 512M or bytes")
    return size


def cache_max_bytes() -> int:
    text = os.environ.get(CACHE_MAX_ENV_VAR) or DEFAULT_CACHE_MAX
    try:
        return parse_size(text)
    except SizeError:
        raise SizeError(
            f"${CACHE_MAX_ENV_VAR}={text!r} is not a size; set it to 60G, 512M or bytes"
        ) from None


class LayerStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache.cache_subdir(cache.LAYERS)
        self.root.mkdir(parents=True, exist_ok=True)

    def image(self, layer: Layer) -> Path:
        if layer.image is not None:
            return layer.image
        return self.root / f"{layer.key}.qcow2"

    def manifest_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def manifest(self, key: str) -> dict | None:
        try:
            return json.loads(self.manifest_path(key).read_text())
        except (OSError, ValueError):
            return None

    def has(self, layer: Layer) -> bool:
        """A stored, finished layer whose whole chain of backing files is still there."""
        if layer.image is not None:
            return layer.image.is_file()
        record = self.manifest(layer.key) if layer.cacheable else None
        if record is None or not self.image(layer).is_file():
            return False
        if layer.parent and record.get("parent_image") != str(self.image(layer.parent)):
            return False  # the overlay names a parent that moved (a moved cache)
        return layer.parent is None or self.has(layer.parent)

    @contextlib.contextmanager
    def building(self, layer: Layer, log: Callable[[str], None]) -> Iterator[None]:
        """Hold the layer's build lock: a second build of the same layer waits, then finds it."""
        with file_lock(
            self.root / f"{layer.key}.lock",
            wait=True,
            busy=f"waiting for layer {layer.name} ({layer.key[:12]}): another build is making it",
            log=log,
        ):
            yield

    def publish(self, layer: Layer, image: Path, profile: str, extra: dict | None = None) -> Path:
        """Move a finished overlay into the store (same filesystem: one rename) once
        `qemu-img check` finds it sound, then write its manifest, which marks it complete."""
        target = self.image(layer)
        incoming = self.root / f".incoming-{layer.key}-{os.getpid()}"
        shutil.move(image, incoming)  # a copy when the build ran on another file system
        _check_image(incoming, layer)
        os.replace(incoming, target)
        now = time.time()
        record = {
            "key": layer.key,
            "name": layer.name,
            "parent": layer.parent.key if layer.parent else None,
            "parent_image": str(self.image(layer.parent)) if layer.parent else None,
            "inputs": layer.inputs,
            "format": LAYER_FORMAT,
            "created": now,
            "last_used": now,
            "profiles": [profile],
            **(extra or {}),
        }
        write_text_atomically(self.manifest_path(layer.key), json.dumps(record, indent=1) + "\n")
        return target

    def touch(self, layer: Layer, profile: str) -> None:
        """Record a use (the LRU order) and who used it."""
        record = self.manifest(layer.key)
        if record is None:
            return
        record["last_used"] = time.time()
        if profile not in record["profiles"]:
            record["profiles"].append(profile)
        write_text_atomically(self.manifest_path(layer.key), json.dumps(record, indent=1) + "\n")

    def entries(self) -> list[dict]:
        """Every finished layer's manifest, with its image's size on disk."""
        found = []
        for path in self.root.glob("*.json"):
            record = self.manifest(path.stem)
            image = self.root / f"{path.stem}.qcow2"
            if record is None or not image.is_file():
                continue
            record["bytes"] = image.stat().st_blocks * 512
            found.append(record)
        return sorted(found, key=lambda r: r["last_used"], reverse=True)

    def remove(self, key: str) -> list[str]:
        """Remove a layer and every layer stored on top of it; return their keys."""
        children = [r["key"] for r in self.entries() if r.get("parent") == key]
        removed = []
        for child in children:
            removed += self.remove(child)
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(key).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{key}.qcow2").unlink()
        # The .lock and .use files stay: another process may be waiting on them.
        return [*removed, key]

    def prune(self, max_bytes: int, keep: frozenset[str] = frozenset()) -> list[dict]:
        """Evict the least recently used layers (with what stands on them) until the store
        holds at most max_bytes; never a layer in `keep` or one whose build lock is held."""
        self._remove_abandoned_publishes()
        removed: list[dict] = []
        entries = self.entries()
        total = sum(r["bytes"] for r in entries)
        for record in reversed(entries):  # oldest use first
            if total <= max_bytes:
                break
            if any(r["key"] == record["key"] for r in removed):
                continue
            # Removing a layer removes what stands on it: spare it when any of those is kept.
            family = {record["key"], *_descendants(record["key"], entries)}
            if family & keep or not all(self._idle(key) for key in family):
                continue
            gone = set(self.remove(record["key"]))
            for entry in entries:
                if entry["key"] in gone:
                    removed.append(entry)
                    total -= entry["bytes"]
        return removed

    def _remove_abandoned_publishes(self) -> None:
        """Half-moved images (`.incoming-<key>-<pid>`) of a publish whose process is gone."""
        for path in self.root.glob(".incoming-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                path.unlink(missing_ok=True)

    def hold(self, layer: Layer, stack: contextlib.ExitStack) -> None:
        """Mark the layer in use until `stack` closes (a shared lock): no prune, from this
        build or another one sharing the store, removes it meanwhile."""
        if layer.image is not None:
            return
        flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW
        descriptor = os.open(self.root / f"{layer.key}.use", flags, 0o644)
        stack.callback(os.close, descriptor)
        fcntl.flock(descriptor, fcntl.LOCK_SH)

    def _idle(self, key: str) -> bool:
        """No build is making the layer and none holds it in use."""
        lock = self.root / f"{key}.lock"
        if lock.exists():
            try:
                with file_lock(lock, wait=False, busy="busy"):
                    pass
            except FactoryError:
                return False
        try:
            descriptor = os.open(self.root / f"{key}.use", os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(descriptor)


def _check_image(image: Path, layer: Layer) -> None:
    """Refuse a damaged overlay before another build can reuse it. Exit 3 is leaked
    clusters only: space lost, nothing wrong with the data."""
    command = ["qemu-img", "check", "-q", str(image)]
    checked = subprocess.run(command, capture_output=True, text=True)
    if checked.returncode not in (0, 3):
        image.unlink(missing_ok=True)
        found = (checked.stdout + checked.stderr).strip().splitlines()[-1:] or ["no output"]
        raise ToolError(
            f"layer {layer.name} ({layer.key[:12]}): qemu-img check failed ({found[0]}); it was "
            "not stored, run the build again"
        )


def chain_keys(chain: list[Layer]) -> list[dict]:
    """Each layer's name and key, root first: what a build manifest records, and what
    `factory verify --profile` compares with the chain a profile makes now."""
    return [{"name": layer.name, "key": layer.key} for layer in chain]


def _descendants(key: str, entries: list[dict]) -> set[str]:
    children = {r["key"] for r in entries if r.get("parent") == key}
    return children.union(*(_descendants(child, entries) for child in children))


@dataclass(frozen=True)
class LayerStatus:
    layer: Layer
    hit: bool
    why: str


def explain(chain: list[Layer], store: LayerStore) -> list[LayerStatus]:
    """For each layer: stored or not, and for a missing one which input changed since the
    last layer of the same name was stored."""
    statuses = []
    known = store.entries()
    parent_missing = False
    for layer in chain:
        if store.has(layer):
            statuses.append(LayerStatus(layer, True, "stored"))
            continue
        if not layer.cacheable:
            why = "never stored (it holds the client's TLS key)"
        elif parent_missing:
            why = "the layer below it is rebuilt"
        else:
            why = _changed_inputs(layer, [r for r in known if r["name"] == layer.name])
        statuses.append(LayerStatus(layer, False, why))
        parent_missing = True
    return statuses


def _changed_inputs(layer: Layer, previous: list[dict]) -> str:
    if not previous:
        return "never built before"
    last = previous[0]  # entries() is most recently used first
    changed = sorted(
        name
        for name in set(layer.inputs) | set(last["inputs"])
        if layer.inputs.get(name) != last["inputs"].get(name)
    )
    if changed:
        return "changed: " + ", ".join(changed)
    if last.get("format") != LAYER_FORMAT:
        return "the layer format changed"
    return "its parent changed"
