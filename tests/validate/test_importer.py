"""importer: the seedless boot answers on the ports the image serves and holds no account
beyond the profile's. Its VM is reached through port probes and the guest agent, not the
target, so the judging functions are fed what the recorded importer boot met."""

from factory.validate.importer import accounts_result, human_accounts, ports_result, served_ports
from tests.validate.conftest import recording


def recorded_answers() -> dict[str, str]:
    return recording()["importer"]["answers"]


def test_the_demo_serves_the_ports_the_importer_boot_probed(loaded):
    assert served_ports(loaded) == sorted(map(int, recorded_answers()))


def test_the_recorded_ports_all_answered(loaded):
    ports = served_ports(loaded)
    answered = [f"{port}: {recorded_answers()[str(port)]}" for port in ports]
    result = ports_result(ports, answered, [])
    assert result.status == "passed" and "22: SSH-2.0-OpenSSH" in result.detail


def test_a_silent_port_fails(loaded):
    ports = served_ports(loaded)
    answered = [f"{port}: {recorded_answers()[str(port)]}" for port in ports if port != 443]
    result = ports_result(ports, answered, ["443: timed out"])
    assert result.status == "failed" and result.detail.startswith("443: timed out")


def test_the_recorded_image_holds_only_the_admin(loaded):
    accounts = human_accounts(recording()["importer"]["passwd"])
    assert accounts == {"analyst": "/bin/bash"}
    assert accounts_result(accounts, loaded.profile.admin.user).status == "passed"


def test_a_cloud_image_default_account_fails(loaded):
    passwd = recording()["importer"]["passwd"]
    admin = next(line for line in passwd.splitlines() if line.startswith("analyst:"))
    debian = admin.replace("analyst", "debian").replace("1001:1001", "1000:1000")
    result = accounts_result(human_accounts(passwd + debian + "\n"), loaded.profile.admin.user)
    assert result.status == "failed" and result.detail.startswith("unexpected: debian;")


def test_an_image_without_the_admin_fails(loaded):
    passwd = recording()["importer"]["passwd"]
    without = "".join(
        line for line in passwd.splitlines(keepends=True) if not line.startswith("analyst:")
    )
    result = accounts_result(human_accounts(without), loaded.profile.admin.user)
    assert (result.status, result.detail) == (
        "failed",
        "login accounts: none (profile: analyst)",
    )
