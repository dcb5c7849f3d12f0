"""What the validator reads from a delivery folder is checked before it reaches a remote
command or a file name: an edited lock file is refused in one line."""

import json

import pytest

from factory.delivery import Delivery
from factory.errors import FactoryError
from factory.validate.run import _delivery_locks, parse_host


@pytest.mark.parametrize("name", ["../../escaped", "env; reboot", ""])
def test_a_lock_whose_name_is_not_an_environment_name_is_refused(tmp_path, name):
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "demo.lock.json").write_text(json.dumps({"name": name, "conda": []}))
    with pytest.raises(FactoryError, match="is not an environment name"):
        _delivery_locks(Delivery(tmp_path, "demo_hello_v1"))


def test_a_lock_with_an_environment_name_is_read(tmp_path):
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "demo.lock.json").write_text(json.dumps({"name": "demo", "conda": []}))
    assert _delivery_locks(Delivery(tmp_path, "demo_hello_v1")) == [{"name": "demo", "conda": []}]


@pytest.mark.parametrize(
    "address, parsed",
    [
        ("it@client.bank.example", ("it", "client.bank.example", 22)),
        ("it@10.0.0.5:2222", ("it", "10.0.0.5", 2222)),
        ("it@[fd00::5]:2222", ("it", "fd00::5", 2222)),
    ],
)
def test_host_addresses_parse(address, parsed):
    assert parse_host(address) == parsed


@pytest.mark.parametrize("address", ["a@b:xx", "a@127.0.0.1:99999", "a@b:0", "nouser", "@b"])
def test_a_bad_host_address_is_one_line(address):
    with pytest.raises(FactoryError, match="expected user@address"):
        parse_host(address)
