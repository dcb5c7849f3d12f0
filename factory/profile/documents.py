"""Reading a profile file strictly: at most 1 MiB of UTF-8 YAML from a regular file, with no
duplicate keys and no merge keys, kept as a node tree so that every message can name its line.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

from factory.errors import ProfileError
from factory.profile.messages import field_path, line_of, walk

MAX_TEXT_BYTES = 1 << 20  # profiles, environment files, TLS files


class _KeyProblem(Exception):
    """A mapping key the profile format refuses (duplicate or merge key)."""

    def __init__(self, mapping: yaml.MappingNode, key: yaml.Node, problem: str) -> None:
        super().__init__(problem)
        self.mapping, self.key = mapping, key


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and merge keys (`<<`): a reviewer reads the
    first block, PyYAML would keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _KeyProblem(
                    node, key_node, "merge keys (<<) are not allowed; write the keys out"
                )
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node:
                raise _KeyProblem(
                    node,
                    key_node,
                    f"duplicate key (first at line {first.start_mark.line + 1}); remove one",
                )
        return super().construct_mapping(node, deep=deep)


def _path_to(node: yaml.Node | None, target: yaml.Node, loc: tuple = ()) -> tuple | None:
    """The field path of `target` in the node tree under `node` (aliases are not followed)."""
    if node is target:
        return loc
    if isinstance(node, yaml.MappingNode):
        children = [(k.value, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
    elif isinstance(node, yaml.SequenceNode):
        children = list(enumerate(node.value))
    else:
        return None
    for part, child in children:
        if child.start_mark.index > node.start_mark.index:  # not an alias pointing back
            found = _path_to(child, target, (*loc, part))
            if found is not None:
                return found
    return None


def read_file(path: Path, where: str, limit: int, kind: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (devices and pipes are refused
    without blocking on them)."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise ProfileError(f"{where}: cannot read {kind} ({error.strerror})") from None
    with os.fdopen(handle, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ProfileError(
                f"{where}: {path} is a special file (a device, pipe or socket), not a {kind}; "
                "name a regular file"
            )
        raw = file.read(limit + 1)
    if len(raw) > limit:
        raise ProfileError(
            f"{where}: {path.name} is larger than {limit >> 20} MiB, too large for a {kind}; "
            "check that the path names the right file"
        )
    return raw


def parse_yaml(path: Path, raw: bytes, kind: str) -> tuple[yaml.Node | None, object]:
    """The node tree (for line numbers) and the data of a YAML file, read strictly."""
    try:
        text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8 text; save the {kind} as UTF-8") from None
    loader = _StrictLoader(text)
    root = None
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    except _KeyProblem as problem:
        loc = (*(_path_to(root, problem.mapping) or ()), problem.key.value)
        line = problem.key.start_mark.line + 1
        raise ProfileError(f"{path}:{line}: {field_path(loc)}: {problem}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ProfileError(f"{where}: not valid YAML ({problem}); fix the syntax") from None
    finally:
        loader.dispose()


@dataclass(frozen=True)
class Document:
    """One file of a profile's extends chain, as read."""

    path: Path
    raw: bytes
    root: yaml.Node
    data: dict
    roots: tuple[Path, ...]  # the folders the files it names must lie in


def read_document(path: Path, roots: tuple[Path, ...]) -> Document:
    """A profile file; `roots` are the folders the files it names must lie in."""
    raw = read_file(path, str(path), MAX_TEXT_BYTES, "profile")
    root, data = parse_yaml(path, raw, "profile")
    if data is None:
        raise ProfileError(f"{path}: profile is empty; start from profiles/demo.yaml")
    if not isinstance(data, dict):
        raise ProfileError(f"{path}:1: a profile is a mapping of keys (client, project, ...)")
    return Document(path, raw, root, data, roots)


def location(document: Document, loc: tuple) -> str:
    """file:line: field of `loc` in `document`."""
    return f"{document.path}:{line_of(document.root, loc)}: {field_path(loc)}"


def location_in(chain: list[Document], loc: tuple) -> str:
    """file:line: field of `loc` in the most specific document of the chain that sets it."""
    return location(next((d for d in chain if walk(d.root, loc)[1]), chain[0]), loc)
