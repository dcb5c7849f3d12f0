"""What the validator reads from a delivery folder is checked before it reaches a remote
command or a file name: an edited lock file is refused in one line."""

import json

import pytest

from factory.errors import FactoryError
from factory.validate import _delivery_locks


@pytest.mark.parametrize("name", ["../../escaped", "env; reboot", ""])
def test_a_lock_whose_name_is_not_an_environment_name_is_refused(tmp_path, name):
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "demo.lock.json").write_text(json.dumps({"name": name, "conda": []}))
    with pytest.raises(FactoryError, match="is not an environment name"):
        _delivery_locks(tmp_path)


def test_a_lock_with_an_environment_name_is_read(tmp_path):
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "demo.lock.json").write_text(json.dumps({"name": "demo", "conda": []}))
    assert _delivery_locks(tmp_path) == [{"name": "demo", "conda": []}]
