"""Air-gapped images: no egress, package tools point only inside the image, and a new
environment can be made from the baked channel."""

from __future__ import annotations

import re

from factory.image_layout import CONDA_PREFIX
from factory.profile import Environment, package_name
from factory.validate.context import CheckContext, CheckResult, quote, result

GROUP = "offline"
BAKED_CHANNEL = "file:///opt/factory/channel"
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


def check_offline(ctx: CheckContext) -> list[CheckResult]:
    if not ctx.loaded.profile.offline:
        return []
    egress = ctx.target.run("curl -s -m 10 -o /dev/null http://deb.debian.org/debian/")
    results = [
        result(
            "offline: the guest has no network egress",
            not egress.ok,
            f"curl to Debian's mirror exit {egress.exit_code}",
            GROUP,
        )
    ]
    config = ctx.target.run(f"cat {CONDA_PREFIX}/.condarc /etc/pip.conf").stdout
    channels = re.findall(r"^\s*-\s*(\S+)", config, re.M)
    pointed = channels == [BAKED_CHANNEL] and "no-index = true" in config
    results.append(
        result(
            "offline: .condarc and pip.conf point only at the image",
            pointed,
            f"conda channels {channels}; pip no-index: {'no-index' in config}",
            GROUP,
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
            result(
                "offline: a new environment is created from the baked channel",
                False,
                f"cannot make a temporary folder: {reason}",
                GROUP,
            )
        )
        return results
    try:
        results += _offline_probe(ctx, first, specs, work)
    finally:
        ctx.target.run(f"sudo rm -rf -- {work}")
    return results


def _offline_probe(
    ctx: CheckContext, first: Environment, specs: list[str], work: str
) -> list[CheckResult]:
    """Create an environment from the baked channel, then pip-install into it, in `work`."""
    create = ctx.target.run(
        f"sudo python3 -c {quote(FACTORY_ENV_IN_FOLDER)} {work} factory-probe "
        + " ".join(map(quote, specs)),
        timeout=900,
    )
    results = [
        result(
            "offline: a new environment is created from the baked channel",
            create.ok,
            (create.stdout or create.stderr).strip()[-300:],
            GROUP,
        )
    ]
    if create.ok and first.pip and "pip" in specs:
        package = package_name(first.pip[0])
        python = f"{work}/factory-probe/bin/python"
        # The probe is removed right after: compiling its bytecode would only cost time.
        pip = ctx.target.run(
            f"sudo {python} -m pip install -q --no-compile {quote(package)}"
            f" && sudo {python} -m pip show {quote(package)}",
            timeout=600,
        )
        results.append(
            result(
                f"offline: pip installs {package} from the wheelhouse",
                pip.ok,
                " ".join((pip.stdout or pip.stderr).split())[:300],
                GROUP,
            )
        )
    return results
