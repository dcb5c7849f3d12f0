"""Shared fixtures. The expensive things (test channel, base image, the demo build and its
validation boot) are built once per session and shared by many checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_PROFILE = REPO / "profiles" / "demo.yaml"
FACTORY = [sys.executable, "-m", "factory"]
# Set by a test on a command it starts, so that what the command leaves running is found.
TEST_MARK_VAR = "FACTORY_TEST_MARK"


def pytest_configure(config: pytest.Config) -> None:
    """A shell that starts the suite in the background without job control hands it SIGINT
    ignored, and every process the tests start would inherit that, so Ctrl-C and the stop
    tests could not reach them. Give the session Python's own handler: its children then
    start with the default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not hasattr(config, "workerinput"):  # once, before the workers start
        _pin_the_security_index(config)


def _pin_the_security_index(config: pytest.Config) -> None:
    """Key every base of this run by the security index as it is now: an update Debian
    publishes during the run would otherwise give later builds a new base, and the tests that
    expect the demo's layers to be hits would see misses."""
    from factory import updates
    from factory.base import recipe
    from factory.base.debian import DEBIAN_RELEASES
    from factory.errors import FactoryError

    if os.environ.get(updates.PIN_VARIABLE):
        return
    pin = Path(tempfile.mkdtemp(prefix="factory-test-pin-")) / "security-index.json"
    components = recipe.COMPONENTS.split(",")
    try:
        for release in DEBIAN_RELEASES.values():
            updates.pin_index_states(pin, release["mirror"], release["suite"], components)
    except FactoryError:  # offline: the tests that need the archive say so themselves
        return
    os.environ[updates.PIN_VARIABLE] = str(pin)
    config.add_cleanup(lambda: shutil.rmtree(pin.parent, ignore_errors=True))


# `make test` runs the suite in two workers (pytest-xdist). The modules that share one of these
# expensive fixtures run in one worker, so that it is made once; the rest are handed out a
# module at a time. The groups go out in this order, the longest first.
SHARED_FIXTURE_MODULES = {
    "clients": ("client_deliveries", ["test_client_profiles.py"]),
    "demo": (
        "demo_delivery",  # built, validated, exported again and booted by vagrant
        [
            "test_deploy.py",
            "test_dossier.py",
            "test_e2e.py",
            "test_layered_build.py",
            "test_oci.py",
            "test_ovf_schema.py",
            "test_pipeline.py",
            "test_provenance.py",
            "test_vagrant.py",
        ],
    ),  # fmt: skip
    "gpu": ("gpu_base", ["test_gpu.py"]),  # DKMS compiling the GPU driver
}
FIRST = [*SHARED_FIXTURE_MODULES, "tests/test_base.py"]


def worker_group(nodeid: str) -> str:
    """The group a test runs in: its shared fixture's, or its module's."""
    module = nodeid.split("::", 1)[0]
    for group, (_fixture, modules) in SHARED_FIXTURE_MODULES.items():
        if module in (f"tests/{name}" for name in modules):
            return group
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for group, (fixture, _modules) in SHARED_FIXTURE_MODULES.items():
            if fixture in item.fixturenames and worker_group(item.nodeid) != group:
                raise pytest.UsageError(
                    f"{item.nodeid} uses {fixture}: add its module to the {group!r} group in "
                    "tests/conftest.py, or the fixture is made twice"
                )
    rank = {group: index for index, group in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(worker_group(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)  # known only where xdist is loaded
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduling, with worker_group as the scope."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return GroupScheduling(config, log)


def run_factory(
    *args: str, env: dict | None = None, timeout: float = 3600, check: bool = False
) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    result = subprocess.run(
        [*FACTORY, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"factory {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    """A small empty qcow2, standing in for a built image where only its export is tested."""
    path = tmp_path_factory.mktemp("disk") / "built.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


@pytest.fixture(scope="session")
def test_channel() -> Path:
    from tests.channel import build_test_channel

    return build_test_channel(log=lambda line: print(line, file=sys.stderr))


@pytest.fixture(scope="session")
def demo_signing_key() -> Path:
    """The key profiles/demo.yaml signs its deliveries with (signing.key, outside the
    checkout), made once per machine with `factory keygen`, as `make demo` makes it."""
    import yaml

    signing = yaml.safe_load(DEMO_PROFILE.read_text())["signing"]
    key = Path(signing["key"]).expanduser()
    if not key.exists():
        made = run_factory("keygen", str(key), "--name", signing["vendor"])
        assert made.returncode == 0 or key.exists(), made.stderr  # or another session made it
    return key


@pytest.fixture(scope="session")
def demo_channel(test_channel: Path, demo_signing_key: Path) -> Path:
    """The demo profile points at outputs/channels/demo; link the test channel there. Every
    build of the demo asks for this fixture, so it also makes the demo's signing key first."""
    link = REPO / "outputs" / "channels" / "demo"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and link.resolve() == test_channel.resolve()):
        made = link.with_name(f".{link.name}.{os.getpid()}")  # replaced whole: the other
        made.unlink(missing_ok=True)  # worker may be reading it
        made.symlink_to(test_channel)
        os.replace(made, link)
    return link


@pytest.fixture(scope="session")
def demo_build_inputs(request: pytest.FixtureRequest) -> Path:
    """The demo channel, with the Debian base image the demo and client builds start from
    made beside it (`factory base build`): on a cold host the base's downloads then overlap
    the channel's CPython compile instead of following it. The base is cached and locked, so
    the other worker's call waits for it or finds it made. Returns the channel's link."""
    import yaml

    base = None
    if os.geteuid() == 0 and shutil.which("packer"):
        release = yaml.safe_load(DEMO_PROFILE.read_text())["base"]  # the client profiles' too
        base_log = tempfile.TemporaryFile(mode="w+")
        base = subprocess.Popen(
            [*FACTORY, "base", "build", release],
            cwd=REPO,
            stdout=base_log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        channel = request.getfixturevalue("demo_channel")
    finally:
        if base is not None:
            if base.wait() != 0:  # the build that needs the base says why it failed
                base_log.seek(0)
                print(f"factory base build failed:\n{base_log.read()[-3000:]}", file=sys.stderr)
            base_log.close()
    return channel


@pytest.fixture(scope="session")
def e2e_outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


class BuildSecrets:
    """What the demo build used that must never leak: its ephemeral SSH private key(s), and
    every command line seen while it ran."""

    def __init__(self) -> None:
        self.private_keys: set[str] = set()
        self.command_lines: set[str] = set()

    def watch(self) -> None:
        for key in Path(tempfile.gettempdir()).glob("factory-key-*/id_ed25519"):
            with contextlib.suppress(OSError):
                self.private_keys.add(key.read_text())
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                self.command_lines.add(cmdline.read_bytes().replace(b"\0", b" ").decode())


@pytest.fixture(scope="session")
def build_secrets() -> BuildSecrets:
    return BuildSecrets()


@pytest.fixture(scope="session")
def demo_delivery(demo_build_inputs: Path, e2e_outputs: Path, build_secrets: BuildSecrets) -> Path:
    """The demo profile built through the real chain (base image, packer, export)."""
    process = subprocess.Popen(
        [*FACTORY, "build", str(DEMO_PROFILE), "--outputs", str(e2e_outputs)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while process.poll() is None:
        build_secrets.watch()
        time.sleep(2)
    output = process.stdout.read() if process.stdout else ""
    print(output, file=sys.stderr)
    assert process.returncode == 0, f"demo build failed:\n{output[-4000:]}"
    delivery = e2e_outputs / "demo_hello_v1"
    assert delivery.is_dir()
    return delivery


@pytest.fixture(scope="session")
def demo_validation(demo_delivery: Path) -> subprocess.CompletedProcess:
    """`factory validate` on the demo delivery: boots the OVA's disk and runs every check."""
    result = run_factory("validate", str(demo_delivery))
    print(result.stdout, result.stderr, file=sys.stderr)
    return result


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices for the base image)")
    if shutil.which("packer") is None:
        pytest.skip("packer is not installed; run `make setup`")


def demo_variant(folder: Path, change=None, file_name: str = "demo.yaml") -> Path:
    """A copy of the demo profile in `folder`, its paths made absolute, edited by `change`
    (a function that edits the parsed YAML in place). The demo's lock goes with it where it
    exists: environments the change leaves alone keep their locked packages, whatever PyPI
    published since, and only a changed one is solved again."""
    import yaml

    profile = yaml.safe_load(DEMO_PROFILE.read_text())
    profile["environments"][0]["channels"] = [str(REPO / "outputs" / "channels" / "demo")]
    profile["notebooks"] = [str(DEMO_PROFILE.parent / n) for n in profile["notebooks"]]
    for service in profile.get("services", []):
        service["files"] = [str(DEMO_PROFILE.parent / f) for f in service.get("files", [])]
    if change:
        change(profile)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    demo_lock = DEMO_PROFILE.with_suffix(".lock")
    if demo_lock.is_dir():
        shutil.copytree(demo_lock, path.with_suffix(".lock"), dirs_exist_ok=True)
    return path


def started_processes(mark: str | None, chrooted_under: Path | None = None) -> list[str]:
    """Live processes a test's command started, whatever else runs on this host (the suite
    runs in two workers): those whose environment carries TEST_MARK_VAR=mark (packer, QEMU
    and the FUSE export inherit it) or, since a chroot starts with a clean environment, whose
    root lies under `chrooted_under`. Each as "pid command line"."""
    needle = f"{TEST_MARK_VAR}={mark}".encode() if mark else None
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            marked = needle is not None and needle in (proc / "environ").read_bytes().split(b"\0")
            root = os.readlink(proc / "root") if chrooted_under else ""
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or a zombie
            continue
        if marked or (chrooted_under and root.startswith(str(chrooted_under))):
            found.append(f"{proc.name} {cmdline}")
    return found


def wait_until(predicate, timeout: float = 30.0) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def forget_layer(profile: Path, name: str, outputs: Path) -> None:
    """Remove the named layer of the profile's build (and those above it) from the layer
    store, so that a build makes it again whatever earlier runs stored."""
    from factory.layers import LayerStore
    from factory.pipeline import BuildOptions, explain_build
    from factory.profile import load_profile

    for status in explain_build(load_profile(profile), BuildOptions(outputs=outputs)):
        if status.layer.name == name and status.hit:
            LayerStore().remove(status.layer.key)
