"""Time from `factory lock` to the conflict error, for each conflict case, on the host.

Writes benchmarks/results/conflict_time.json. The in-image figure it is compared with is the
time a build spends before its conda stage starts (pass it with --packer-seconds-to-conda;
`factory build` prints it), the earliest point at which an in-image solve could fail.

    .venv/bin/python benchmarks/conflict_time.py [--packer-seconds-to-conda N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.channel import build_test_channel  # noqa: E402
from tests.test_resolve import profile_with  # noqa: E402

CASES = {
    "two pins of one package": ("[wants-pinned-lib-1, wants-pinned-lib-2]", "[]"),
    "package needs newer python": ("[needs-newer-python]", "[]"),
    "package does not exist": ("[no-such-package]", "[]"),
    "pip package without a wheel for the python": ("[]", "[numpy==1.21.0]"),
}


def timed_lock(path: Path) -> dict:
    """`factory lock PROFILE` as a user runs it: its seconds, exit status and error line."""
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "factory", "lock", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    error = next((ln for ln in run.stderr.splitlines() if ln.startswith("error:")), "")
    return {"seconds": round(seconds, 2), "exit": run.returncode, "error": error}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--packer-seconds-to-conda",
        type=float,
        default=None,
        help="measured seconds from `packer build` start to the conda stage",
    )
    args = parser.parse_args()
    channel = build_test_channel(log=lambda line: None)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (conda, pip) in CASES.items():
            case_dir = Path(scratch) / str(len(results))
            case_dir.mkdir()
            path = profile_with(case_dir, channel, conda, pip)
            results[name] = timed_lock(path)
            case = results[name]
            print(f"{case['seconds']:6.2f} s  exit {case['exit']}  {name}: {case['error']}")
    out = REPO / "benchmarks" / "results" / "conflict_time.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"host_lock": results, "in_image_earliest_seconds": args.packer_seconds_to_conda},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
