"""A full disk is reported as a full disk, at once, and never blamed on the network."""

import time
from pathlib import Path

import pytest

from factory import base, cache
from factory.errors import FactoryError


@pytest.mark.parametrize(
    "fetch", [cache.download, base._download], ids=["cache.download", "base._download"]
)
def test_a_full_disk_is_not_retried_as_a_network_error(fetch):
    started = time.monotonic()
    with pytest.raises(FactoryError) as error:
        fetch("file:///etc/os-release", Path("/dev/full"))
    message = str(error.value)
    assert "No space left on device" in message and "network" not in message, message
    assert time.monotonic() - started < 1.0  # no retries with backoff
