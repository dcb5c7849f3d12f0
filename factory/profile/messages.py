"""One line for the person who reads a problem: `file:line: field.path: what is wrong (fix)`.

Pydantic says where an error is as a path of field names, list indices and mapping keys, mixed
with its own labels for union branches and validators. The labels are told apart by shape, not
by name: a part that is not a field, index or key at its level of the model is a label.
"""

from __future__ import annotations

import difflib
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

# A message that names its own field first: 'environments[0].channels[1]: ...'
_NAMED_FIELD = re.compile(r"^([a-z_]+(?:\.[a-z_]+|\[\d+\])*): (.*)$")


def walk(root: yaml.Node | None, loc: tuple) -> tuple[int | None, bool]:
    """The YAML line of a field path (or of its nearest parent) and whether the whole path
    exists in this document."""
    node, line = root, (root.start_mark.line + 1) if root is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                return line, False
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line, False
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line, False
    return line, True


def line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    return walk(root, loc)[0]


def field_path(loc: tuple) -> str:
    """'environments[0].name' from ('environments', 0, 'name')."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "(top level)"


def parse_field_path(text: str) -> tuple:
    """('environments', 0, 'channels') from 'environments[0].channels'."""
    return tuple(
        int(part[1:-1]) if part.startswith("[") else part
        for part in re.findall(r"\[\d+\]|[a-z_]+", text)
    )


def validation_problem(errors: list[dict], model: type[BaseModel]) -> tuple[tuple, str]:
    """The field path and the message of the most telling of pydantic's `errors` for `model`."""
    error = _most_telling(errors)
    loc, fields = _field_loc(tuple(error["loc"]), model, error["type"] == "extra_forbidden")
    detail = _describe(error, loc, fields)
    named = _NAMED_FIELD.match(detail)
    if named and list(loc) == list(parse_field_path(named.group(1)))[: len(loc)]:
        loc, detail = parse_field_path(named.group(1)), named.group(2)
    return loc, detail


def _most_telling(errors: list[dict]) -> dict:
    """Prefer an unknown key; skip union branches that only say the literal did not match."""
    useful = [e for e in errors if e["type"] != "literal_error" or len(errors) == 1]
    useful.sort(key=lambda e: e["type"] != "extra_forbidden")
    return (useful or errors)[0]


def _describe(error: dict, loc: tuple, fields: list[str]) -> str:
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1) if loc else []
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
        return f"unknown key ({hint})"
    if error["type"] == "missing":
        return "required field is missing (add it)"
    return error["msg"].removeprefix("Value error, ")


def _field_loc(loc: tuple, model: type[BaseModel], keeps_last: bool) -> tuple[tuple, list[str]]:
    """`loc` without pydantic's labels, and the field names at the level of its last part.
    With `keeps_last` the last part is the user's unknown key, kept though it is no field."""
    kept: list[Any] = []
    annotation: Any = model
    fields: list[str] = []
    for position, part in enumerate(loc):
        child = _child(annotation, part)
        if position == len(loc) - 1:
            fields = _field_names(annotation)
        if child is not None:
            kept.append(part)
            annotation = child
        elif keeps_last and position == len(loc) - 1:
            kept.append(part)
    return tuple(kept), fields


def _members(annotation: Any) -> list[Any]:
    """The types a value of `annotation` may have (unions and Annotated unwrapped)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [] if annotation is type(None) else [annotation]


def _child(annotation: Any, part: object) -> Any | None:
    """The annotation of `part` inside a value of `annotation`, or None when `part` is no
    field name, list index or mapping key there (then it is one of pydantic's labels)."""
    for member in _members(annotation):
        origin, args = get_origin(member), get_args(member)
        if isinstance(member, type) and issubclass(member, BaseModel):
            field = member.model_fields.get(part) if isinstance(part, str) else None
            if field is not None:
                return field.annotation
        elif origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
            return args[0]
        elif origin is dict and isinstance(part, str) and len(args) == 2:
            return args[1]
    return None


def _field_names(annotation: Any) -> list[str]:
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return [name for m in models for name in m.model_fields]
