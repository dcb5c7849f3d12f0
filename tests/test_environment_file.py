"""environment_file: an environment.yml is read as conda reads it. A wrong shape is one line
naming the environment file, its line and the field; channel-qualified specs are kept and
solved against the channel they name."""

from pathlib import Path

import pytest

from factory.errors import ProfileError
from factory.profile import load_profile
from factory.resolve import solve_channels
from tests.test_profile import GOOD, write

PROFILE = GOOD.split("environments:")[0] + "environments:\n  - environment_file: environment.yml\n"
ENVIRONMENT = """\
name: scoring
channels:
  - conda-forge
dependencies:
  - python=3.11
  - numpy>=1.26
  - pip
  - pip:
      - tabulate
"""


def load_with(tmp_path: Path, environment: str):
    (tmp_path / "environment.yml").write_text(environment)
    return load_profile(write(tmp_path, PROFILE))


def test_a_conda_export_is_imported(tmp_path):
    env = load_with(tmp_path, ENVIRONMENT).profile.environments[0]
    assert (env.name, env.python, env.channels) == ("scoring", "3.11", ["conda-forge"])
    assert (env.conda, env.pip) == (["python=3.11", "numpy>=1.26", "pip"], ["tabulate"])


BAD = [
    # (replace, with, line, expected): every message names environment.yml:line and the field
    (
        "  - conda-forge\n",
        " conda-forge\n",
        2,
        "channels: is the single string 'conda-forge', not a list",
    ),
    ("  - conda-forge\n", "  - 5\n", 3, "channels[0]: must be a channel name or URL, not int"),
    ("  - conda-forge\n", "  - {url: x}\n", 3, "channels[0]: must be a channel name or URL"),
    ("      - tabulate\n", "", 8, "dependencies[3].pip: must be a list of pip requirement strings"),
    ("  - pip:\n      - tabulate\n", "  - pip: 5\n", 8, "dependencies[3].pip: must be a list"),
    (
        "      - tabulate\n",
        "      - 5\n",
        8,
        "dependencies[3].pip: must be a list of pip requirement",
    ),
    ("  - pip\n", "  - 3.11\n", 7, "dependencies[2]: must be a conda spec such as"),
    ("  - pip\n", "  - {conda: [six]}\n", 7, "dependencies[2]: must be a conda spec"),
    ("name: scoring", "name: 5", 1, "name: must be a string"),
    (ENVIRONMENT[ENVIRONMENT.index("dep") :], "dependencies: numpy\n", 4, "dependencies: must be"),
    ("name: scoring\n", "name: scoring\nname: other\n", 2, "name: duplicate key (first at line 1)"),
    ("  - pip\n", "  - &p pip\n  - *p\n  - <<: {x: 1}\n", 9, "merge keys (<<) are not allowed"),
]


@pytest.mark.parametrize("old,new,line,expected", BAD, ids=[b[3][:40] for b in BAD])
def test_a_wrong_shape_is_one_line_naming_the_file_and_line(tmp_path, old, new, line, expected):
    assert old in ENVIRONMENT
    with pytest.raises(ProfileError) as error:
        load_with(tmp_path, ENVIRONMENT.replace(old, new))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'environment.yml'}:{line}: "), message
    assert expected in message
    assert "\n" not in message


def test_an_oversize_environment_file_is_refused(tmp_path):
    padding = "# " + "x" * 1000 + "\n"
    with pytest.raises(ProfileError, match=r"environment.yml is larger than 1 MiB"):
        load_with(tmp_path, ENVIRONMENT + padding * 1100)


def test_channel_qualified_specs_load_and_name_their_channel(tmp_path):
    """'channel::name' in the profile and in environment.yml: the channel is one of the
    environment's by name, else resolved like any channel and added after them."""
    text = ENVIRONMENT.replace("  - numpy>=1.26\n", "  - conda-forge::numpy>=1.26\n")
    loaded = load_with(tmp_path, text.replace("  - pip\n", "  - pytorch::pytorch\n  - pip\n"))
    env = loaded.profile.environments[0]
    assert env.conda == ["python=3.11", "conda-forge::numpy>=1.26", "pytorch::pytorch", "pip"]
    urls, specs = solve_channels(loaded, env)
    assert urls == ["https://conda.anaconda.org/conda-forge", "https://conda.anaconda.org/pytorch"]
    assert "https://conda.anaconda.org/conda-forge::numpy>=1.26" in specs
    assert "https://conda.anaconda.org/pytorch::pytorch" in specs


def test_a_spec_channel_names_the_environments_mirror_of_that_name(tmp_path):
    (tmp_path / "mirrors" / "conda-forge").mkdir(parents=True)
    text = ENVIRONMENT.replace("  - conda-forge\n", "  - ./mirrors/conda-forge\n")
    loaded = load_with(tmp_path, text.replace("  - numpy", "  - conda-forge::numpy"))
    urls, specs = solve_channels(loaded, loaded.profile.environments[0])
    mirror = (tmp_path / "mirrors" / "conda-forge").as_uri()
    assert urls == [mirror]
    assert f"{mirror}::numpy>=1.26" in specs


def test_profile_conda_specs_may_name_a_channel_but_pip_specs_may_not(tmp_path):
    text = GOOD.replace("conda: [numpy]", "conda: ['conda-forge::numpy>=1.26', pytorch::pytorch]")
    env = load_profile(write(tmp_path, text)).profile.environments[0]
    assert env.conda == ["conda-forge::numpy>=1.26", "pytorch::pytorch"]
    with pytest.raises(ProfileError, match=r"environments\[0\].pip: 'pypi::six' is not"):
        load_profile(write(tmp_path, text + "    pip: ['pypi::six']\n"))


def test_miniforge_refuses_an_anaconda_channel_named_in_a_spec(tmp_path):
    text = GOOD.replace("conda: [numpy]", "conda: ['defaults::numpy']") + (
        "conda: {installer: miniforge, url: 'file:///srv/Miniforge3.sh', sha256: '"
        + "a" * 64
        + "'}\n"
    )
    with pytest.raises(ProfileError, match="uses Anaconda's channel 'defaults'"):
        load_profile(write(tmp_path, text))
