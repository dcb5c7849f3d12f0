"""The checks a profile promises. Each returns CheckResults; each is able to fail."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from factory.export import _XML_FORBIDDEN
from factory.profile import BUILD_USER, Environment, LoadedProfile, package_name
from factory.resolve import image_environments
from factory.validate.target import Target

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
# Terminal escape sequences (CSI colours, OSC titles, two-character escapes), as nbclient's
# tracebacks and other tools' stderr carry them.
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[0-~])")


def printable_detail(text: str) -> str:
    """A check's detail without terminal escapes or the characters XML cannot hold, so every
    report (JSON, JUnit XML, HTML) can carry it."""
    return _XML_FORBIDDEN.sub("", _ANSI_ESCAPE.sub("", text))


@dataclass
class CheckResult:
    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    group: str = "image"

    def __post_init__(self) -> None:
        self.detail = printable_detail(str(self.detail))


@dataclass
class CheckContext:
    target: Target
    loaded: LoadedProfile
    throwaway_vm: bool
    root_login_probe: Callable[[], str] | None = None
    password_login_probe: Callable[[], str] | None = None
    locks: list[dict] = field(default_factory=list)
    # Where the validator reaches a guest TCP port (forwarded for a VM, direct for a host).
    address: Callable[[int], tuple[str, int]] | None = None
    # A port no profile opens, forwarded to a throwaway VM to prove the firewall drops it.
    unlisted_port: int | None = None
    extra: dict = field(default_factory=dict)


def _result(name: str, ok: bool, detail: str, group: str) -> CheckResult:
    return CheckResult(name, PASSED if ok else FAILED, detail, group=group)


ENV_PROBE = r"""
import importlib, importlib.metadata as md, json, os, platform, sys
request = json.load(sys.stdin)
out = {"python": platform.python_version(), "prefix": sys.prefix, "conda": {}, "pip": {}}
meta = os.path.join(sys.prefix, "conda-meta")
records = {}
for name in os.listdir(meta) if os.path.isdir(meta) else []:
    if name.endswith(".json"):
        with open(os.path.join(meta, name)) as handle:
            record = json.load(handle)
        records[record["name"]] = record["version"]
for package in request["conda"]:
    out["conda"][package] = records.get(package)
modules = md.packages_distributions()
for package in request["pip"]:
    try:
        version = md.version(package)
    except md.PackageNotFoundError:
        out["pip"][package] = {"error": "not installed"}
        continue
    dist = md.distribution(package)
    wanted = {package.lower().replace("-", "_")}
    tops = [m for m, dists in modules.items()
            if any(d.lower().replace("-", "_") in wanted for d in dists) and not m.startswith("_")]
    try:
        for module in tops[:3] or [package.replace("-", "_")]:
            importlib.import_module(module)
        out["pip"][package] = {"version": version, "imported": tops[:3]}
    except Exception as error:
        out["pip"][package] = {"version": version, "error": f"import failed: {error}"}
    del dist
print(json.dumps(out))
"""


def check_environment(ctx: CheckContext, env: Environment) -> list[CheckResult]:
    group = f"env:{env.name}"
    prefix = f"/opt/conda/envs/{env.name}"
    conda = [n for n in map(package_name, env.conda) if n != "python"]
    pip = [package_name(s) for s in env.pip]
    request = json.dumps({"conda": conda, "pip": pip})
    result = ctx.target.run(f"{prefix}/bin/python -c {_quote(ENV_PROBE)}", stdin=request)
    if not result.ok:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return [
            CheckResult(
                f"{env.name}: environment exists",
                FAILED,
                f"{prefix}/bin/python failed: {reason}",
                group=group,
            )
        ]
    data = json.loads(result.stdout)
    results = [
        _result(
            f"{env.name}: environment exists",
            data["prefix"] == prefix,
            f"sys.prefix is {data['prefix']}",
            group,
        ),
        _result(
            f"{env.name}: python {env.python}",
            (data["python"] + ".").startswith(env.python + "."),
            f"python {data['python']}",
            group,
        ),
    ]
    for name in conda:
        version = data["conda"].get(name)
        results.append(
            _result(
                f"{env.name}: conda package {name}",
                version is not None,
                f"version {version}" if version else "not installed",
                group,
            )
        )
    for name in pip:
        info = data["pip"].get(name, {"error": "not reported"})
        ok = "error" not in info
        detail = (
            f"{info.get('version')} imports {', '.join(info.get('imported', []))}"
            if ok
            else info["error"]
        )
        results.append(_result(f"{env.name}: imports {name}", ok, detail, group))
    return results


def jupyter_token(ctx: CheckContext) -> str:
    """The Jupyter token the image made on its first boot ('' when there is none)."""
    return ctx.target.run(
        "sudo sed -n 's/^JUPYTER_TOKEN=//p' /etc/factory/jupyter.env 2>/dev/null"
    ).stdout.strip()


def unit_user(ctx: CheckContext, unit: str) -> str:
    """The user that a systemd service's main process runs as ('' when it is not running)."""
    return ctx.target.run(
        f"ps -o user= -p $(systemctl show -p MainPID --value {unit}.service)"
    ).stdout.strip()


def _quote(text: str) -> str:
    from factory.escape import shell_word

    return shell_word(text)


def http_status_command(url: str, headers_on_stdin: bool = False) -> str:
    """curl printing only the HTTP status of a GET. With headers_on_stdin, curl reads request
    headers from its stdin (-H @-), so a token never appears on a command line (ps, auditd)."""
    return f"curl -s -o /dev/null -w '%{{http_code}}' {'-H @- ' if headers_on_stdin else ''}{url}"


def check_jupyter(ctx: CheckContext) -> list[CheckResult]:
    jupyter = ctx.loaded.profile.jupyter
    group = "jupyter"
    if not jupyter.enabled:
        return [
            CheckResult(
                "jupyter: disabled in profile", SKIPPED, "jupyter.enabled is false", group=group
            )
        ]
    results = []
    deadline = time.monotonic() + 300
    status = ""
    while time.monotonic() < deadline:
        status = ctx.target.run("systemctl is-active jupyter.service").stdout.strip()
        if status not in ("activating", "inactive", ""):
            break
        time.sleep(5)
    results.append(
        _result("jupyter: service active", status == "active", f"is-active: {status}", group)
    )
    user = unit_user(ctx, "jupyter")
    results.append(
        _result(
            "jupyter: runs as a non-root user",
            user not in ("", "root"),
            f"process user: {user or 'none'}",
            group,
        )
    )
    url = f"http://127.0.0.1:{jupyter.port}/api/status"
    answer = ""
    while time.monotonic() < deadline:
        probe = ctx.target.run(http_status_command(url))
        answer = probe.stdout.strip()
        if answer in ("200", "403"):
            break
        time.sleep(5)
    results.append(
        _result(
            "jupyter: answers on 127.0.0.1 and wants a token",
            answer == "403",
            f"GET /api/status without token -> HTTP {answer or 'no answer'}",
            group,
        )
    )
    authorised = ctx.target.run(
        http_status_command(url, headers_on_stdin=True),
        stdin=f"Authorization: token {jupyter_token(ctx)}\n",
    ).stdout.strip()
    results.append(
        _result(
            "jupyter: answers with the first-boot token",
            authorised == "200",
            f"GET /api/status with token -> HTTP {authorised}",
            group,
        )
    )
    listen = ctx.target.run(f"ss -Htln 'sport = :{jupyter.port}'").stdout
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listen.splitlines() if line}
    results.append(
        _result(
            "jupyter: bound to 127.0.0.1 only",
            addresses == {"127.0.0.1"},
            f"listening on {sorted(addresses) or 'nothing'}",
            group,
        )
    )
    return results


NOTEBOOK_RUNNER = r"""
import sys, nbclient, nbformat
notebook = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(notebook, timeout=1200, kernel_name=sys.argv[2]).execute()
print(f"{len(notebook.cells)} cells ran")
"""
SAMPLES_DIR = "/srv/jupyter/notebooks/samples"


def check_kernels_and_samples(ctx: CheckContext) -> list[CheckResult]:
    """Every environment is a Jupyter kernel; every sample notebook runs headless."""
    profile = ctx.loaded.profile
    if not profile.jupyter.enabled:
        return []
    group = "notebooks"
    listed = ctx.target.run("/opt/conda/envs/jupyter/bin/jupyter kernelspec list --json")
    try:
        kernels = set(json.loads(listed.stdout)["kernelspecs"])
    except (json.JSONDecodeError, KeyError):
        kernels = set()
    wanted = {env.name for env in profile.environments}
    results = [
        _result(
            "jupyter: each environment is a kernel",
            wanted <= kernels,
            f"kernels {sorted(kernels)}; environments {sorted(wanted)}",
            group,
        )
    ]
    kernel = profile.environments[0].name
    for notebook in profile.notebooks:
        name = notebook.rsplit("/", 1)[-1]
        run = ctx.target.run(
            "sudo -u jupyter -H sh -c "
            + _quote(
                f'work=$(mktemp -d) && cd "$work" && cp {SAMPLES_DIR}/{_quote(name)} . && '
                f"/opt/conda/envs/jupyter/bin/python -c {_quote(NOTEBOOK_RUNNER)} "
                f'{_quote(name)} {_quote(kernel)}; status=$?; rm -rf "$work"; exit $status'
            ),
            timeout=1800,
        )
        error = (run.stderr.strip().splitlines() or ["no output"])[-1]
        results.append(
            _result(
                f"notebooks: {name} runs headless",
                run.ok,
                run.stdout.strip() or error[:300],
                group,
            )
        )
    return results


def check_ssh_hardening(ctx: CheckContext) -> list[CheckResult]:
    group = "ssh"
    config = ctx.target.run("sudo sshd -T").stdout.lower()
    settings = dict(line.split(" ", 1) for line in config.splitlines() if " " in line)
    results = [
        _result(
            "ssh: sshd denies root login",
            settings.get("permitrootlogin") == "no",
            f"permitrootlogin {settings.get('permitrootlogin')}",
            group,
        ),
        _result(
            "ssh: sshd denies passwords",
            settings.get("passwordauthentication") == "no",
            f"passwordauthentication {settings.get('passwordauthentication')}",
            group,
        ),
    ]
    # TCP forwarding stays on: the validator reaches Jupyter through it.
    limits = {"x11forwarding": "no", "maxauthtries": "3", "logingracetime": "30"}
    results.append(
        _result(
            "ssh: no X11 forwarding, 3 tries and 30 s to log in",
            all(settings.get(k) == v for k, v in limits.items()),
            ", ".join(f"{k} {settings.get(k)}" for k in limits),
            group,
        )
    )
    if ctx.root_login_probe is not None:
        outcome = ctx.root_login_probe()
        results.append(
            _result(
                "ssh: root login with an authorised key is refused",
                outcome.startswith("refused"),
                outcome,
                group,
            )
        )
    if ctx.password_login_probe is not None:
        outcome = ctx.password_login_probe()
        results.append(
            _result("ssh: password login is refused", outcome.startswith("refused"), outcome, group)
        )
    admin = ctx.loaded.profile.admin
    keys = ctx.target.run(f"sudo cat ~{admin.user}/.ssh/authorized_keys").stdout
    have = {" ".join(k.split()[:2]) for k in keys.splitlines() if k.strip()}
    want = {" ".join(k.split()[:2]) for k in admin.ssh_keys}
    results.append(
        _result(
            f"ssh: {admin.user} has exactly the profile's keys",
            have == want,
            f"{len(have)} key(s) installed, {len(want)} in the profile",
            group,
        )
    )
    return results


def check_build_credentials_removed(ctx: CheckContext) -> list[CheckResult]:
    group = "hygiene"
    leftovers = []
    if ctx.target.run(f"getent passwd {BUILD_USER}").ok:
        leftovers.append(f"user {BUILD_USER}")
    probe = ctx.target.run(
        f"sudo sh -c 'ls -d /home/{BUILD_USER} /tmp/factory-payload "
        f"2>/dev/null; grep -rl {BUILD_USER} /etc/sudoers /etc/sudoers.d /etc/passwd /etc/shadow "
        "/etc/group 2>/dev/null'"
    )
    leftovers += [line for line in probe.stdout.splitlines() if line.strip()]
    return [
        _result(
            "hygiene: no build credentials left",
            not leftovers,
            "; ".join(leftovers) or f"no {BUILD_USER} user, home, sudoers or payload",
            group,
        )
    ]


def check_cloud_init(ctx: CheckContext) -> list[CheckResult]:
    result = ctx.target.run("cloud-init status --wait --long", timeout=900)
    status = re.search(r"^status:\s*(\S+)", result.stdout, re.M)
    value = status.group(1) if status else "unknown"
    errors = re.search(r"^errors:\s*(.*)$", result.stdout, re.M)
    detail = f"status: {value}" + (f"; errors: {errors.group(1)}" if errors else "")
    return [
        _result(
            "cloud-init: finished without errors", value == "done" and result.ok, detail, "boot"
        )
    ]


EXPORT_PROBE = r"""
import importlib.metadata as md, json, os, sys
meta = os.path.join(sys.prefix, "conda-meta")
conda = {}
for name in sorted(os.listdir(meta)) if os.path.isdir(meta) else []:
    if name.endswith(".json"):
        with open(os.path.join(meta, name)) as handle:
            record = json.load(handle)
        conda[record["name"]] = record["version"]
pip = {d.metadata["Name"].lower().replace("_", "-").replace(".", "-"): d.version
       for d in md.distributions()}
print(json.dumps({"conda": conda, "pip": pip}, sort_keys=True))
"""


def export_environment(ctx: CheckContext, name: str) -> dict | None:
    """What is really installed in an environment: conda records and pip distributions."""
    result = ctx.target.run(f"/opt/conda/envs/{name}/bin/python -c {_quote(EXPORT_PROBE)}")
    return json.loads(result.stdout) if result.ok else None


def check_matches_lock(ctx: CheckContext, lock: dict) -> list[CheckResult]:
    """Every locked package is installed at its locked version; the export is kept."""
    name, group = lock["name"], f"env:{lock['name']}"
    installed = export_environment(ctx, name)
    if installed is None:
        return [
            CheckResult(
                f"{name}: matches its lock", FAILED, "cannot read the environment", group=group
            )
        ]
    ctx.extra.setdefault("exports", {})[name] = installed
    wrong = []
    for package in lock["conda"]:
        have = installed["conda"].get(package["name"])
        if have != package["version"]:
            wrong.append(f"{package['name']} {have or 'missing'} (lock {package['version']})")
    for package in lock["pip"]:
        have = installed["pip"].get(package["name"])
        if have != package["version"]:
            wrong.append(f"{package['name']} {have or 'missing'} (lock {package['version']})")
    count = len(lock["conda"]) + len(lock["pip"])
    detail = "; ".join(wrong) or f"all {count} locked packages at their locked versions"
    return [_result(f"{name}: matches its lock", not wrong, detail, group)]


def check_offline(ctx: CheckContext) -> list[CheckResult]:
    """Air-gapped images: no egress, package tools point only inside, and a new environment
    can be made from the baked channel."""
    group = "offline"
    if not ctx.loaded.profile.offline:
        return []
    egress = ctx.target.run("curl -s -m 10 -o /dev/null http://deb.debian.org/debian/")
    results = [
        _result(
            "offline: the guest has no network egress",
            not egress.ok,
            f"curl to Debian's mirror exit {egress.exit_code}",
            group,
        )
    ]
    config = ctx.target.run("cat /opt/conda/.condarc /etc/pip.conf").stdout
    channels = re.findall(r"^\s*-\s*(\S+)", config, re.M)
    pointed = channels == ["file:///opt/factory/channel"] and "no-index = true" in config
    results.append(
        _result(
            "offline: .condarc and pip.conf point only at the image",
            pointed,
            f"conda channels {channels}; pip no-index: {'no-index' in config}",
            group,
        )
    )
    first = ctx.loaded.profile.environments[0]
    specs = [f"python={first.python}"] + [
        n for n in map(package_name, first.conda) if n not in ("python",)
    ]
    # A live host is left as it was found: the probe environment goes into a fresh temporary
    # folder, which is removed afterwards, on a throwaway VM too (one path, tested by both).
    made = ctx.target.run("sudo mktemp -d /var/tmp/factory-probe.XXXXXXXX")
    work = made.stdout.strip()
    if not made.ok or not PROBE_FOLDER.fullmatch(work):
        reason = (made.stderr.strip() or work or "no output")[-300:]
        results.append(
            _result(
                "offline: a new environment is created from the baked channel",
                False,
                f"cannot make a temporary folder: {reason}",
                group,
            )
        )
        return results
    try:
        results += _offline_probe(ctx, first, specs, work, group)
    finally:
        ctx.target.run(f"sudo rm -rf -- {work}")
    return results


# Runs the image's own factory-env (its argument checks, solve and install) with its
# environments folder moved to argv[1], so that the probe never touches /opt/conda/envs.
FACTORY_ENV_IN_FOLDER = r"""
import importlib.machinery, importlib.util, pathlib, sys
loader = importlib.machinery.SourceFileLoader("factory_env", "/usr/local/bin/factory-env")
module = importlib.util.module_from_spec(importlib.util.spec_from_loader("factory_env", loader))
loader.exec_module(module)
module.ENVS = pathlib.Path(sys.argv[1])
sys.argv = ["factory-env", "create", *sys.argv[2:]]
module.main()
"""
PROBE_FOLDER = re.compile(r"/var/tmp/factory-probe\.[A-Za-z0-9]{8}")


def _offline_probe(
    ctx: CheckContext, first: Environment, specs: list[str], work: str, group: str
) -> list[CheckResult]:
    """Create an environment from the baked channel, then pip-install into it, in `work`."""
    create = ctx.target.run(
        f"sudo python3 -c {_quote(FACTORY_ENV_IN_FOLDER)} {work} factory-probe "
        + " ".join(map(_quote, specs)),
        timeout=900,
    )
    results = [
        _result(
            "offline: a new environment is created from the baked channel",
            create.ok,
            (create.stdout or create.stderr).strip()[-300:],
            group,
        )
    ]
    if create.ok and first.pip and "pip" in specs:
        package = package_name(first.pip[0])
        python = f"{work}/factory-probe/bin/python"
        pip = ctx.target.run(
            f"sudo {python} -m pip install -q {_quote(package)}"
            f" && sudo {python} -m pip show {_quote(package)}",
            timeout=600,
        )
        results.append(
            _result(
                f"offline: pip installs {package} from the wheelhouse",
                pip.ok,
                " ".join((pip.stdout or pip.stderr).split())[:300],
                group,
            )
        )
    return results


SUITES = (
    "importer",
    "cpu",
    "cloud-init",
    "env",
    "lock",
    "jupyter",
    "https",
    "kernels",
    "ssh",
    "firewall",
    "services",
    "monitoring",
    "audit",
    "updates",
    "credentials",
    "hygiene",
    "offline",
    "gpu",
)


def run_all_checks(ctx: CheckContext, only: Iterable[str] = SUITES) -> list[CheckResult]:
    """Every check the profile implies, in a stable order; `only` names a subset of SUITES."""
    from factory.validate import cpu, gpu, hardening

    suites: list[tuple[str, Callable[[], list[CheckResult]]]] = [
        ("cpu", lambda: cpu.check_cpu_level(ctx)),
        ("cloud-init", lambda: check_cloud_init(ctx)),
    ]
    suites += [
        ("env", lambda env=env: check_environment(ctx, env))
        for env in image_environments(ctx.loaded)
    ]
    suites += [("lock", lambda lock=lock: check_matches_lock(ctx, lock)) for lock in ctx.locks]
    suites += [
        ("jupyter", lambda: check_jupyter(ctx)),
        ("https", lambda: hardening.check_https(ctx)),
        ("kernels", lambda: check_kernels_and_samples(ctx)),
        ("ssh", lambda: check_ssh_hardening(ctx)),
        ("firewall", lambda: hardening.check_firewall(ctx)),
        ("services", lambda: hardening.check_services_unprivileged(ctx)),
        ("monitoring", lambda: hardening.check_monitoring(ctx)),
        ("audit", lambda: hardening.check_audit(ctx)),
        ("updates", lambda: hardening.check_updates(ctx)),
        ("credentials", lambda: check_build_credentials_removed(ctx)),
        ("hygiene", lambda: hardening.check_image_hygiene(ctx)),
        ("offline", lambda: check_offline(ctx)),
        ("gpu", lambda: gpu.check_gpu_level1(ctx)),
        ("gpu", lambda: gpu.check_gpu_level2(ctx)),
    ]
    wanted = set(only)
    results: list[CheckResult] = []
    for key, suite in suites:
        if key not in wanted:
            continue
        started = time.monotonic()
        try:
            batch = suite()
        except Exception as error:  # a crashed check is a failed check, never a pass
            batch = [CheckResult(f"check crashed: {type(error).__name__}", FAILED, str(error))]
        spent = (time.monotonic() - started) / max(len(batch), 1)
        for item in batch:
            item.seconds = round(spent, 2)
        results += batch
    return results
