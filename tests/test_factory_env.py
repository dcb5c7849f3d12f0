"""factory-env's command line, run on the host with this venv's py-rattler: a wrong call
prints the usage, never a traceback, and changes nothing. What each command does is checked
in the booted image (validate/snapshots.py, validate/offline.py)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

FACTORY_ENV = REPO / "provisioners" / "factory-env"


@pytest.mark.parametrize(
    "arguments",
    [["snapshot", "--keep"], ["snapshot", "--keep", "many"], ["snapshot", "now"], ["rollback"]],
)
def test_a_wrong_call_prints_the_usage(arguments):
    called = subprocess.run(
        [sys.executable, str(FACTORY_ENV), *arguments], capture_output=True, text=True
    )
    assert called.returncode == 1
    assert "Traceback" not in called.stderr
    assert "sudo factory-env snapshot [--keep N]" in called.stderr
