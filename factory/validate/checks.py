"""Temporary: the names other modules' tests still import from here. The checks now live one
resource per module; import from context.py, env.py, jupyter.py and suites.py instead."""

from factory.validate.context import FAILED, PASSED, SKIPPED, CheckContext, CheckResult
from factory.validate.env import check_environment
from factory.validate.jupyter import http_status_command
from factory.validate.suites import SUITES, run_all_checks

__all__ = [
    "FAILED",
    "PASSED",
    "SKIPPED",
    "SUITES",
    "CheckContext",
    "CheckResult",
    "check_environment",
    "http_status_command",
    "run_all_checks",
]
