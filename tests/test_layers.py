"""The layer store on real qcow2 overlays: keys, hits, LRU prune, build locks shared between
real processes, explain, and `factory cache ls` / `prune` through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.cli_build import format_explain
from factory.errors import FactoryError, ToolError
from factory.layers import Layer, LayerStore, cache_max_bytes, explain, parse_size
from tests.conftest import REPO, run_factory, wait_until

# Holds a layer's build lock, as a build in another process would, until stdin closes.
LOCK_HOLDER = """
import sys
from pathlib import Path
from factory.files import file_lock
with file_lock(Path(sys.argv[1]), wait=False, busy="busy"):
    Path(sys.argv[2]).touch()
    sys.stdin.read()
"""

# "Builds" the system layer under the store's build lock, as a build would: a finished
# overlay is published only when the store does not hold it yet. <who>.building and
# <who>.waiting mark where it is; the build waits for the gate file before it publishes.
BUILDER = """
import subprocess, sys, time
from pathlib import Path
from factory.layers import Layer, LayerStore
root, base_image, marks, who = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
store = LayerStore(root)
layer = Layer("system", {"packages": "vim"}, Layer("base", {"release": "12"}, image=base_image))

def log(line):
    print(line, flush=True)
    (marks / f"{who}.waiting").touch()

with store.building(layer, log):
    if store.has(layer):
        print("found", flush=True)
    else:
        (marks / f"{who}.building").touch()
        while not (marks / "gate").exists():
            time.sleep(0.05)
        scratch = marks / f"{who}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base_image),
                        "-F", "qcow2", str(scratch), "64M"], check=True)
        store.publish(layer, scratch, who)
        print("built", flush=True)
"""


def qcow2(path: Path, backing: Path | None = None) -> Path:
    """A real 64 MiB qcow2, an overlay on `backing` when given."""
    backing_args = ["-b", str(backing), "-F", "qcow2"] if backing else []
    command = ["qemu-img", "create", "-q", "-f", "qcow2", *backing_args, str(path), "64M"]
    subprocess.run(command, check=True, capture_output=True)
    return path


class Chain:
    """base (an image of its own) -> system -> conda -> env:demo, and env:other on conda."""

    def __init__(self, tmp: Path, packages: str = "vim") -> None:
        self.tmp = tmp
        image = tmp / "base.qcow2"
        if not image.exists():
            qcow2(image)
        self.base = Layer("base", {"release": "12"}, image=image)
        self.system = Layer("system", {"packages": packages}, self.base)
        self.conda = Layer("conda", {"installer": "miniforge-24"}, self.system)
        self.demo = Layer("env:demo", {"lock": "aaa"}, self.conda)
        self.other = Layer("env:other", {"lock": "bbb"}, self.conda)
        self.client = Layer("client", {"profile": "demo"}, self.demo, cacheable=False)


def publish(store: LayerStore, layer: Layer, profile: str = "demo") -> Path:
    """Build a layer the way a build does: an overlay on its parent's image, then publish."""
    assert layer.parent is not None
    scratch = store.root.parent / f"scratch-{layer.key[:12]}.qcow2"
    qcow2(scratch, backing=store.image(layer.parent))
    return store.publish(layer, scratch, profile)


@pytest.fixture
def store(tmp_path: Path) -> LayerStore:
    return LayerStore(root=tmp_path / "cache" / "layers")


def stored_keys(store: LayerStore) -> set[str]:
    return {record["key"] for record in store.entries()}


def test_the_key_changes_with_an_input_the_name_or_the_parent_and_only_then(tmp_path: Path):
    chain, again = Chain(tmp_path), Chain(tmp_path)
    assert chain.conda.key == again.conda.key  # same inputs, same chain: same key
    assert Layer("conda", {"b": "2", "a": "1"}).key == Layer("conda", {"a": "1", "b": "2"}).key
    assert Chain(tmp_path, packages="vim curl").system.key != chain.system.key
    assert Layer("conda", chain.conda.inputs, chain.system).key == chain.conda.key
    assert Layer("mamba", chain.conda.inputs, chain.system).key != chain.conda.key
    # A changed parent changes every key above it, though their own inputs are the same.
    changed = Chain(tmp_path, packages="vim curl")
    assert changed.conda.key != chain.conda.key
    assert changed.demo.key != chain.demo.key
    assert len(chain.conda.key) == 64 and int(chain.conda.key, 16) >= 0


def test_a_layer_is_there_once_published_and_gone_with_its_parents_image(
    tmp_path: Path, store: LayerStore
):
    chain = Chain(tmp_path)
    assert store.has(chain.base)  # a root layer is its own image
    assert not store.has(chain.system)
    publish(store, chain.system)
    assert store.has(chain.system)
    assert not store.has(chain.conda)
    publish(store, chain.conda)
    assert store.has(chain.conda)
    # The overlay is a real qcow2 on its parent's stored image.
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(store.image(chain.conda))],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert Path(info["backing-filename"]) == store.image(chain.system)
    store.image(chain.system).unlink()
    assert not store.has(chain.system)
    assert not store.has(chain.conda)  # its manifest and image are there, its backing is not
    assert not store.has(chain.client)  # never stored


def test_a_damaged_overlay_is_never_published(tmp_path: Path, store: LayerStore):
    """qemu-img check runs before the rename: a truncated overlay (its refcount block cut
    off, as a full disk or a dead copy to shared storage leaves it) is refused and removed,
    and nothing of it is stored."""
    chain = Chain(tmp_path)
    scratch = tmp_path / "scratch.qcow2"
    qcow2(scratch, backing=store.image(chain.base))
    with open(scratch, "r+b") as image:
        image.truncate(70000)
    with pytest.raises(ToolError, match=r"layer system \(\w{12}\): qemu-img check failed"):
        store.publish(chain.system, scratch, "demo")
    assert not store.has(chain.system)
    assert not store.image(chain.system).exists()
    assert list(store.root.iterdir()) == []
    publish(store, chain.system)  # a sound one is stored
    assert store.has(chain.system)


def test_publish_and_touch_record_when_and_by_whom(tmp_path: Path, store: LayerStore):
    chain = Chain(tmp_path)
    before = time.time()
    publish(store, chain.system, profile="bank")
    record = store.manifest(chain.system.key)
    assert record is not None
    assert record["name"] == "system" and record["parent"] == chain.base.key
    assert record["inputs"] == {"packages": "vim"}
    assert record["profiles"] == ["bank"]
    assert before <= record["created"] == record["last_used"] <= time.time()
    time.sleep(0.01)
    store.touch(chain.system, "hospital")
    store.touch(chain.system, "bank")
    touched = store.manifest(chain.system.key)
    assert touched is not None
    assert touched["profiles"] == ["bank", "hospital"]
    assert touched["last_used"] > record["last_used"]
    assert touched["created"] == record["created"]


def test_prune_evicts_the_least_recently_used_with_what_stands_on_it(
    tmp_path: Path, store: LayerStore
):
    chain = Chain(tmp_path)
    for layer in (chain.system, chain.conda, chain.demo, chain.other):
        publish(store, layer)
        time.sleep(0.01)
    for layer in (chain.conda, chain.demo, chain.system):  # other is now the oldest use
        store.touch(layer, "demo")
        time.sleep(0.01)
    assert [r["name"] for r in store.entries()] == ["system", "env:demo", "conda", "env:other"]
    total = sum(r["bytes"] for r in store.entries())
    assert total > 0
    removed = store.prune(total - 1)
    assert [r["name"] for r in removed] == ["env:other"]
    assert not store.image(chain.other).exists()
    assert not store.manifest_path(chain.other.key).exists()
    # Next oldest is conda: env:demo stands on it, so it goes too, though used later.
    system_bytes = next(r["bytes"] for r in store.entries() if r["name"] == "system")
    removed = store.prune(system_bytes)
    assert {r["name"] for r in removed} == {"conda", "env:demo"}
    assert stored_keys(store) == {chain.system.key}
    assert store.prune(10**12) == []  # under the limit: nothing to do
    assert {r["name"] for r in store.prune(0)} == {"system"}
    assert store.entries() == []


def test_prune_never_removes_a_kept_layer_nor_what_it_stands_on(tmp_path: Path, store: LayerStore):
    chain = Chain(tmp_path)
    for layer in (chain.system, chain.conda, chain.demo, chain.other):
        publish(store, layer)
    removed = store.prune(0, keep=frozenset({chain.demo.key}))
    assert {r["name"] for r in removed} == {"env:other"}
    assert stored_keys(store) == {chain.system.key, chain.conda.key, chain.demo.key}
    assert store.has(chain.demo)


def test_prune_spares_a_layer_whose_build_lock_another_process_holds(
    tmp_path: Path, store: LayerStore
):
    chain = Chain(tmp_path)
    for layer in (chain.system, chain.conda, chain.demo, chain.other):
        publish(store, layer)
    held = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(store.root / f"{chain.other.key}.lock"), held],
        cwd=REPO,
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(held.exists), "the lock holder never took the lock"
        removed = store.prune(0)
        assert {r["name"] for r in removed} == {"env:demo"}
        # env:other's lock is held, so it stays, and so do the layers under it.
        assert stored_keys(store) == {chain.system.key, chain.conda.key, chain.other.key}
    finally:
        holder.communicate("", timeout=30)
    assert {r["name"] for r in store.prune(0)} == {"system", "conda", "env:other"}


def test_explain_says_why_each_layer_is_missing(tmp_path: Path, store: LayerStore):
    chain = Chain(tmp_path)
    statuses = explain([chain.base, chain.system, chain.conda], store)
    assert [(s.hit, s.why) for s in statuses] == [
        (True, "stored"),
        (False, "never built before"),
        (False, "the layer below it is rebuilt"),
    ]
    for layer in (chain.system, chain.conda):
        publish(store, layer)
    statuses = explain([chain.base, chain.system, chain.conda, chain.demo, chain.client], store)
    assert [(s.layer.name, s.hit, s.why) for s in statuses] == [
        ("base", True, "stored"),
        ("system", True, "stored"),
        ("conda", True, "stored"),
        ("env:demo", False, "never built before"),
        ("client", False, "never stored (it holds the client's TLS key)"),
    ]
    changed = Chain(tmp_path, packages="vim curl")
    statuses = explain([changed.base, changed.system, changed.conda], store)
    assert [s.why for s in statuses] == [
        "stored",
        "changed: packages",
        "the layer below it is rebuilt",
    ]


def test_format_explain_shows_each_layer_with_its_key_and_reason(tmp_path: Path, store: LayerStore):
    chain = Chain(tmp_path)
    publish(store, chain.system)
    layers = [chain.base, chain.system, chain.conda, chain.demo]
    lines = format_explain(explain(layers, store)).splitlines()
    assert lines[0].split() == ["LAYER", "KEY", "CACHE", "WHY"]
    assert lines[1].split() == ["base", chain.base.key[:12], "hit", "stored"]
    assert lines[2].split() == ["system", chain.system.key[:12], "hit", "stored"]
    assert lines[3].split()[:3] == ["conda", chain.conda.key[:12], "miss"]
    assert lines[3].endswith("never built before")
    assert lines[4].endswith("the layer below it is rebuilt")
    assert lines[5] == "2 of 4 layers stored; a build starts at conda"
    publish(store, chain.conda)
    publish(store, chain.demo)
    assert format_explain(explain(layers, store)).endswith("a build reuses them all")


def test_two_processes_building_one_layer_make_it_once(tmp_path: Path, store: LayerStore):
    chain = Chain(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()

    def builder(who: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(store.root), str(chain.base.image), marks, who],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )

    first = builder("first")
    assert wait_until((marks / "first.building").exists)
    second = builder("second")
    assert wait_until((marks / "second.waiting").exists), "the second build did not wait"
    assert not store.has(chain.system)
    (marks / "gate").touch()
    first_out, _ = first.communicate(timeout=60)
    second_out, _ = second.communicate(timeout=60)
    assert (first.returncode, second.returncode) == (0, 0)
    assert first_out.splitlines() == ["built"]
    assert second_out.splitlines()[0].startswith("waiting for layer system")
    assert second_out.splitlines()[-1] == "found"
    assert not (marks / "second.building").exists()
    assert store.has(chain.system)
    assert [r["profiles"] for r in store.entries()] == [["first"]]
    assert sorted(p.name for p in store.root.glob("*.qcow2")) == [f"{chain.system.key}.qcow2"]


def test_cache_ls_lists_each_layer_and_each_cache_folder(tmp_path: Path, store: LayerStore):
    chain = Chain(tmp_path)
    publish(store, chain.system, profile="bank_credit_v2")
    publish(store, chain.conda, profile="bank_credit_v2")
    store.touch(chain.conda, "demo_hello_v1")
    result = run_factory("--cache-dir", str(tmp_path / "cache"), "cache", "ls", timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KEY", "LAYER", "SIZE", "LAST", "USED", "PROFILES"]
    assert lines[1].startswith(f"{chain.conda.key[:12]}  conda")  # most recently used first
    assert "just now" in lines[1] and lines[1].endswith("bank_credit_v2, demo_hello_v1")
    assert lines[2].startswith(f"{chain.system.key[:12]}  system")
    assert "KiB" in lines[2]
    assert lines[3].startswith("2 layers, ")
    folders = {line.split()[0] for line in lines[4:] if line.strip()}
    assert {"base/", "downloads/", "pkgs/", "layers/", "total"} <= folders


def test_cache_prune_evicts_down_to_max_and_says_what_it_freed(tmp_path: Path, store: LayerStore):
    chain = Chain(tmp_path)
    for layer in (chain.system, chain.conda, chain.other, chain.demo):
        publish(store, layer)
        time.sleep(0.01)
    for layer in (chain.conda, chain.demo, chain.system):  # env:other is now the oldest use
        store.touch(layer, "demo")
    cache_args = ("--cache-dir", str(tmp_path / "cache"), "cache", "prune")
    total = sum(r["bytes"] for r in store.entries())
    result = run_factory(*cache_args, "--max", str(total - 1), timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"removed {chain.other.key[:12]} env:other (")
    assert lines[1].startswith("freed ") and "3 layers" in lines[1]
    assert stored_keys(store) == {chain.system.key, chain.conda.key, chain.demo.key}
    result = run_factory(*cache_args, timeout=60, env={"FACTORY_CACHE_MAX": "0"})
    assert result.returncode == 0, result.stderr
    assert sum(line.startswith("removed ") for line in result.stdout.splitlines()) == 3
    assert store.entries() == []
    assert list(store.root.glob("*.qcow2")) == []


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("--max", "lots"), {}, "--max: 'lots' is not a size"),
        (("--max", "-1G"), {}, "--max: '-1G' is not a size"),
        ((), {"FACTORY_CACHE_MAX": "60 gigs"}, "$FACTORY_CACHE_MAX='60 gigs' is not a size"),
    ],
)
def test_cache_prune_refuses_a_bad_size_in_one_line(tmp_path: Path, args, env, named):
    cache_args = ("--cache-dir", str(tmp_path / "cache"), "cache", "prune")
    result = run_factory(*cache_args, *args, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {named}")
    assert "60G" in result.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [("60G", 60 * 2**30), ("512M", 512 * 2**20), ("1.5k", 1536), ("2GiB", 2 * 2**30),
     ("10GB", 10 * 2**30), ("4096", 4096), ("0", 0), (" 1T ", 2**40)],
)  # fmt: skip
def test_parse_size_reads_units(text: str, size: int):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "lots", "1.5X", "-1G", "inf", "1e999", "nan"])
def test_parse_size_refuses_what_is_not_a_size(text: str):
    with pytest.raises(ValueError, match="is not a size; write it as 60G, 512M or bytes"):
        parse_size(text)


def test_a_bad_cache_max_names_the_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FACTORY_CACHE_MAX", "much")
    with pytest.raises(FactoryError, match=r"\$FACTORY_CACHE_MAX='much'"):
        cache_max_bytes()
    monkeypatch.delenv("FACTORY_CACHE_MAX")
    assert cache_max_bytes() == 60 * 2**30


def test_prune_removes_the_half_moved_image_of_a_publish_whose_process_is_gone(tmp_path):
    store = LayerStore(root=tmp_path / "layers")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    abandoned = store.root / f".incoming-{'a' * 64}-{gone}"
    running = store.root / f".incoming-{'b' * 64}-{os.getpid()}"
    abandoned.write_bytes(b"half an image")
    running.write_bytes(b"being moved")
    store.prune(max_bytes=2**40)
    assert not abandoned.exists()
    assert running.exists()
