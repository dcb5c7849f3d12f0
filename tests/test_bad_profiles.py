"""Every file in tests/profiles/bad/ is refused with its expected one-line message, through
the real CLI: exit code 1, no traceback, nothing built."""

import re
from pathlib import Path

import pytest

from factory.errors import ProfileError
from factory.profile import load_profile
from tests.conftest import run_factory

BAD = Path(__file__).parent / "profiles" / "bad"
CASES = sorted(BAD.glob("*.yaml"))


def expected_message(path: Path) -> str:
    match = re.match(r"# expect: (.+)", path.read_text().splitlines()[0])
    assert match, f"{path.name} has no '# expect:' first line"
    return match.group(1)


def test_corpus_has_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_profile_message(path):
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    message = str(error.value)
    assert expected_message(path) in message
    assert "\n" not in message
    assert re.match(rf"^{re.escape(str(BAD))}/[\w.-]+\.yaml(:\d+)?: ", message), message


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_profile_cli(path, tmp_path):
    result = run_factory("render", str(path), "--outputs", str(tmp_path))
    assert result.returncode == 2  # bad input
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected_message(path) in lines[0]
    assert list(tmp_path.iterdir()) == []
