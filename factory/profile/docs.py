"""The reference docs of the profile format, generated from the model so that they cannot drift:
`profile.md` (every key with its type, default and meaning, and the presets) and
`profile.schema.json` (for editors: completion and checks while typing).

    python -m factory.profile.docs [FOLDER]    # default: docs/ of this checkout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from factory.profile.paths import CHECKOUT_DIR, PRESETS_DIR
from factory.profile.schema import Profile

SCHEMA_FILE = "profile.schema.json"
REFERENCE_FILE = "profile.md"
REGENERATE = "python -m factory.profile.docs"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def editor_schema() -> dict:
    """The model's JSON schema for editors. No key is required in it: a profile that extends
    another may leave any key to it, and only the merged profile is complete."""
    schema = Profile.model_json_schema()
    _drop_required(schema)
    comment = (
        f"Generated from the profile model (factory/profile/) by `{REGENERATE}`; do not edit. "
        "No key is marked required because a profile may take any key from what it extends; "
        "factory checks the merged profile."
    )
    return {"$schema": JSON_SCHEMA_DIALECT, "$comment": comment, **schema}


def schema_text() -> str:
    """docs/profile.schema.json as written (what `factory schema` can print)."""
    return json.dumps(editor_schema(), indent=2, ensure_ascii=False) + "\n"


def reference_markdown() -> str:
    """docs/profile.md: a table of keys per section of the profile, then the presets."""
    top = Profile.model_json_schema()
    definitions = top["$defs"]
    lines = [
        "# Profile reference",
        "",
        f"> Generated from the profile model (`factory/profile/`) by `{REGENERATE}`. "
        "Do not edit: change the model and run it again.",
        "",
        f"{Profile.__doc__} Unknown keys are refused. A profile may `extends` other profile "
        "files or presets: mappings merge key by key, and any other value (a list included) "
        "replaces the one it extends. Editors that read `# yaml-language-server: $schema=...` "
        f"complete keys from [{SCHEMA_FILE}]({SCHEMA_FILE}).",
    ]
    sections = _sections()
    paths = {model.__name__: path for path, model in sections}
    for path, model in sections:
        name = model.__name__
        schema = top if model is Profile else definitions[name]
        heading = "Top level" if model is Profile else f"`{path}`"
        lines += ["", f"## {heading}", ""]
        if model is not Profile:
            lines += [f"{model.__doc__}", ""]
        lines += ["| Key | Type | Default | Meaning |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            prop = schema["properties"][key]
            cells = [
                f"`{key}`",
                _type(prop, paths),
                _default(field, paths),
                field.description or _section_doc(field.annotation),
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "## Presets", "", "`extends: NAME` builds on one of these.", ""]
    lines += ["| Preset | What it sets up |", "|---|---|"]
    for preset in sorted(PRESETS_DIR.glob("*.yaml")):
        lines.append(f"| `{preset.stem}` | {_cell(_leading_comment(preset))} |")
    return "\n".join(lines) + "\n"


def generated_files() -> dict[str, str]:
    """The name and text of each generated file."""
    return {SCHEMA_FILE: schema_text(), REFERENCE_FILE: reference_markdown()}


def write_docs(folder: Path) -> list[Path]:
    """Write both generated files into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generated_files().items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written


def _sections() -> list[tuple[str, type[BaseModel]]]:
    """(field path, model) of the profile and of every section under it, depth first."""
    found: list[tuple[str, type[BaseModel]]] = []

    def visit(path: str, model: type[BaseModel]) -> None:
        if any(seen is model for _, seen in found):
            return
        found.append((path, model))
        for key, field in model.model_fields.items():
            for inner, suffix in _models_in(field.annotation):
                visit(f"{path}.{key}{suffix}".lstrip("."), inner)

    visit("", Profile)
    return found


def _models_in(annotation: Any, suffix: str = "") -> list[tuple[type[BaseModel], str]]:
    """The models an annotation holds, each with '[]' per list it sits in."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, suffix)]
    listed = get_origin(annotation) is list
    return [
        found
        for arg in get_args(annotation)
        for found in _models_in(arg, suffix + ("[]" if listed else ""))
    ]


def _type(prop: dict, paths: dict[str, str]) -> str:
    """A JSON schema property in words; `paths` gives the field path of each section model."""
    if "$ref" in prop:
        return f"mapping, see `{paths[prop['$ref'].rsplit('/', 1)[-1]]}`"
    if "anyOf" in prop:
        kinds = [_type(p, paths) for p in prop["anyOf"] if p.get("type") != "null"]
        return " or ".join(kinds)
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    kind = prop.get("type")
    if kind == "array":
        words = "list of " + _type(prop.get("items", {}), paths)
        return words + (f", at least {prop['minItems']}" if "minItems" in prop else "")
    if kind == "object":
        keys = prop.get("propertyNames", {})
        key_words = _type(keys, paths) if keys else "string"
        value_words = _type(prop.get("additionalProperties", {}), paths)
        return f"mapping of {key_words} to {value_words}"
    words = {"integer": "integer", "string": "string", "boolean": "true or false"}.get(kind, "any")
    if "minimum" in prop and "maximum" in prop:
        words += f" from {prop['minimum']} to {prop['maximum']}"
    elif "minimum" in prop:
        words += f" of at least {prop['minimum']}"
    if "maxLength" in prop:
        words += f" of at most {prop['maxLength']} characters"
    if "pattern" in prop:
        words += f" matching `{prop['pattern']}`"
    return words


def _default(field: Any, paths: dict[str, str]) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return f"see `{paths[type(value).__name__]}`"
    return "none" if value is None else f"`{json.dumps(value)}`"


def _section_doc(annotation: Any) -> str:
    """What a section is for, from its model's docstring, for a key without a description."""
    return next((model.__doc__ or "" for model, _ in _models_in(annotation)), "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _leading_comment(path: Path) -> str:
    comment = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    return " ".join(comment).removeprefix("Preset: ")


def _drop_required(node: object) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("required"), list):
            del node["required"]
        for value in node.values():
            _drop_required(value)
    elif isinstance(node, list):
        for value in node:
            _drop_required(value)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args and CHECKOUT_DIR is None:
        print(f"usage: {REGENERATE} FOLDER (no checkout here to write docs/ into)")
        return 2
    folder = Path(args[0]) if args else CHECKOUT_DIR / "docs"
    for path in write_docs(folder):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
