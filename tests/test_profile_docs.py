"""docs/profile.md and docs/profile.schema.json are generated from the profile model, marked as
generated and current; every example profile points editors at the schema, and an error in an
example still names its line in the file (the schema line counted)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from factory.errors import ProfileError
from factory.profile import Profile, load_profile
from factory.profile.docs import REGENERATE, generated_files, main
from factory.profile.paths import PRESETS_DIR
from tests.conftest import REPO

DOCS = REPO / "docs"
EXAMPLES = sorted((REPO / "profiles").glob("*.yaml"))
SCHEMA_LINE = "# yaml-language-server: $schema=../docs/profile.schema.json"


@pytest.mark.parametrize("name", sorted(generated_files()))
def test_committed_docs_are_current(name):
    committed = (DOCS / name).read_text(encoding="utf-8")
    assert committed == generated_files()[name], f"docs/{name} is stale; run `{REGENERATE}`"


def test_generated_files_say_they_are_generated_and_how_to_regenerate():
    files = generated_files()
    assert REGENERATE in json.loads(files["profile.schema.json"])["$comment"]
    header = files["profile.md"].splitlines()[:4]
    assert any("Generated" in line and REGENERATE in line for line in header), header


def test_the_generator_writes_both_files(tmp_path):
    assert main([str(tmp_path)]) == 0
    for name, text in generated_files().items():
        assert (tmp_path / name).read_text(encoding="utf-8") == text


def _tables(markdown: str) -> dict[str, set[str]]:
    """The keys listed under each '## heading' of the reference."""
    tables: dict[str, set[str]] = {}
    heading = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip("`")
            tables[heading] = set()
        elif heading and (key := re.match(r"^\| `([a-z_0-9-]+)` \|", line)):
            tables[heading].add(key.group(1))
    return tables


def test_the_reference_lists_every_key_of_every_section():
    schema = Profile.model_json_schema()
    tables = _tables(generated_files()["profile.md"])
    assert tables.pop("Top level") == set(schema["properties"])
    listed = {frozenset(keys) for keys in tables.values()}
    for name, definition in schema["$defs"].items():
        assert frozenset(definition["properties"]) in listed, f"no section lists {name}'s keys"
    assert tables["Presets"] == {p.stem for p in PRESETS_DIR.glob("*.yaml")}


def _resolved(node: dict, schema: dict) -> dict:
    return schema["$defs"][node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node


def _unknown_keys(data: object, node: dict, schema: dict, path: str = "") -> list[str]:
    """Keys of `data` that the JSON schema `node` does not define."""
    node = _resolved(node, schema)
    if "anyOf" in node:  # the option of the data's shape: a mapping, a list or a scalar
        kind = {dict: "object", list: "array"}.get(type(data))
        options = [_resolved(o, schema) for o in node["anyOf"]]
        shaped = [o for o in options if kind and o.get("type") == kind]
        return _unknown_keys(data, shaped[0], schema, path) if shaped else []
    if isinstance(data, list) and "items" in node:
        return [
            unknown
            for index, item in enumerate(data)
            for unknown in _unknown_keys(item, node["items"], schema, f"{path[:-1]}[{index}].")
        ]
    if not isinstance(data, dict) or "properties" not in node:
        return []
    unknown = [f"{path}{key}" for key in data if key not in node["properties"]]
    for key, value in data.items():
        if key in node["properties"]:
            unknown += _unknown_keys(value, node["properties"][key], schema, f"{path}{key}.")
    return unknown


@pytest.mark.parametrize(
    "path",
    [*EXAMPLES, *sorted(PRESETS_DIR.glob("*.yaml"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_the_editor_schema_knows_every_key_a_shipped_profile_uses(path):
    schema = json.loads((DOCS / "profile.schema.json").read_text(encoding="utf-8"))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert _unknown_keys(data, schema, schema) == []
    typos = {"resources": {"cpu": 2}, "base": {"urll": "x"}, "environments": [{"pyton": "3"}]}
    assert _unknown_keys(typos, schema, schema) == [
        "resources.cpu",
        "base.urll",
        "environments[0].pyton",
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_profile_points_editors_at_the_schema(path):
    assert path.read_text(encoding="utf-8").splitlines()[0] == SCHEMA_LINE
    target = SCHEMA_LINE.split("$schema=", 1)[1]
    assert (path.parent / target).resolve() == (DOCS / "profile.schema.json").resolve()


@pytest.fixture
def examples_copy(tmp_path) -> Path:
    """The example profiles and their notebooks, copied so that they can be broken."""
    folder = tmp_path / "profiles"
    shutil.copytree(REPO / "profiles" / "notebooks", folder / "notebooks")
    shutil.copytree(REPO / "profiles" / "services", folder / "services")
    for path in EXAMPLES:
        shutil.copy(path, folder / path.name)
    return folder


BREAKS = [
    (re.compile(r"^client: .*$", re.M), "client: Not A Name", "client: must start with a letter"),
    (
        re.compile(r"^    python: .*$", re.M),
        '    python: "three"',
        "environments[0].python: must look like '3.11'",
    ),
]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_error_in_an_example_names_its_line_in_the_file(examples_copy, path):
    text = path.read_text(encoding="utf-8")
    broken_any = False
    for pattern, replacement, expected in BREAKS:
        found = pattern.search(text)
        if not found:
            continue  # this example takes the key from what it extends
        broken_any = True
        line = text.count("\n", 0, found.start()) + 1
        copy = examples_copy / path.name
        copy.write_text(pattern.sub(replacement, text, count=1), encoding="utf-8")
        with pytest.raises(ProfileError) as error:
            load_profile(copy)
        assert str(error.value).startswith(f"{copy}:{line}: {expected}"), str(error.value)
        assert line > 1
    assert broken_any or "extends:" in text
