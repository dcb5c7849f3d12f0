"""A committed lock of an example profile must match its profile: `factory lock --check` on
each one, offline and in seconds, so CI fails when a profile changes without its lock."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, run_factory


def _committed(folder: Path) -> bool:
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--", str(folder)], capture_output=True, text=True
    )
    return listed.returncode == 0 and bool(listed.stdout.strip())


def test_every_committed_example_lock_matches_its_profile():
    profiles = sorted((REPO / "profiles").glob("*.yaml"))
    locked = [p for p in profiles if _committed(p.with_suffix(".lock"))]
    if not locked:
        pytest.skip("no example lock is committed (README, Locks: they name this host's cache)")
    stale = {}
    for profile in locked:
        result = run_factory("lock", str(profile), "--check")
        if result.returncode != 0:
            stale[profile.name] = result.stderr.strip()
    assert not stale, stale
