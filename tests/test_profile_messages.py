"""Pydantic's errors become `field.path: message`. Its labels for union branches, validators and
mapping keys are left out by their place in the model, whatever they are called, so renaming a
validator or a model does not change a message."""

from typing import Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from factory.profile import Profile
from factory.profile.messages import field_path, parse_field_path, validation_problem
from tests.test_profile import GOOD


class Leaf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str

    @field_validator("url")
    @classmethod
    def any_name_at_all(cls, value: str) -> str:
        if value.startswith("ftp"):
            raise ValueError("must not be ftp")
        return value


class Tree(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: Literal["plain"] | Leaf = "plain"
    tags: str | list[str] = ""
    leaves: list[Leaf] = []
    weights: dict[Literal["a", "b"], int] = {}

    @model_validator(mode="after")
    def renamed_at_will(self) -> "Tree":
        if self.tags == "bad":
            raise ValueError("leaves[0].url: named by the message itself")
        return self


def problem(model: type[BaseModel], data: dict) -> tuple[tuple, tuple, str]:
    """(pydantic's own loc, the field path we report, the message)."""
    with pytest.raises(ValidationError) as raised:
        model.model_validate(data)
    errors = raised.value.errors()
    loc, message = validation_problem(errors, model)
    return tuple(errors[-1]["loc"]), loc, message


CASES = [
    ({"base": {"url": "ftp://x"}}, ("base", "url"), "must not be ftp"),
    ({"base": {"url": 5}}, ("base", "url"), "Input should be a valid string"),
    ({"base": {"url": "x", "urll": "y"}}, ("base", "urll"), "unknown key (did you mean 'url'?)"),
    ({"tags": 5}, ("tags",), "Input should be a valid"),
    ({"leaves": [{"url": "ftp://x"}]}, ("leaves", 0, "url"), "must not be ftp"),
    ({"weights": {"c": 1}}, ("weights", "c"), "Input should be 'a' or 'b'"),
    ({"weights": {"a": "x"}}, ("weights", "a"), "Input should be a valid integer"),
    ({"tags": "bad"}, ("leaves", 0, "url"), "named by the message itself"),
    ({"leavs": []}, ("leavs",), "unknown key (did you mean 'leaves'?)"),
]


@pytest.mark.parametrize("data,loc,message", CASES)
def test_labels_are_left_out_by_shape(data, loc, message):
    _, reported, text = problem(Tree, data)
    assert reported == loc
    assert text.startswith(message), text


def test_pydantic_does_put_labels_in_the_loc_that_we_leave_out():
    raw, reported, _ = problem(Tree, {"base": {"url": "ftp://x"}})
    assert len(raw) > len(reported)  # e.g. the union branch's name between base and url
    raw, reported, _ = problem(Tree, {"weights": {"c": 1}})
    assert len(raw) > len(reported)  # the mapping key's own label


def test_a_profile_error_under_a_union_names_the_field():
    profile = yaml.safe_load(GOOD) | {"base": {"url": "ftp://x/y.qcow2", "sha256": "0" * 64}}
    _, reported, text = problem(Profile, profile)
    assert reported == ("base", "url")
    assert text.startswith("must be an http://")


@pytest.mark.parametrize(
    "loc,text",
    [
        (("environments", 0, "channels", 1), "environments[0].channels[1]"),
        (("client",), "client"),
        (("gpu", "frameworks", "pytorch"), "gpu.frameworks.pytorch"),
    ],
)
def test_field_paths_read_back(loc, text):
    assert field_path(loc) == text
    assert parse_field_path(text) == loc


def test_the_top_level_has_a_name():
    assert field_path(()) == "(top level)"
