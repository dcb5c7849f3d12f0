"""Stage 6: boot the delivered artifact (or reach a live host) and check what the profile
promises. The checks live one resource per module (env, jupyter, https, ssh, firewall, ...),
suites.py orders them, run.py runs them and report.py writes the reports."""

from factory.validate.run import (
    LOCAL_HOST,
    ValidationOutcome,
    validate_delivery,
    validate_host,
)
from factory.validate.suites import SUITES

__all__ = [
    "LOCAL_HOST",
    "SUITES",
    "ValidationOutcome",
    "validate_delivery",
    "validate_host",
]
