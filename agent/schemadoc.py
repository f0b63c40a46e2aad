"""A config file's reference in Markdown, made from its JSON Schema (pydantic's).

One section per object the file can hold, the file itself first, then every nested
object in the order the schema defines them; each a table of its fields: the name, the
type (a link to a nested object's section), the default (required when it has none) and
the description. ``edgefleet-agent schema --markdown`` and ``edgefleet controller schema
--markdown`` print it; docs/agent-config-reference.md and
docs/controller-config-reference.md are their output, kept fresh by tests/test_config.py.

Threads: none.
"""

from __future__ import annotations

import json
from typing import Any

_REF = "#/$defs/"


def reference_markdown(schema: dict[str, Any], *, title: str, intro: str) -> str:
    """The Markdown reference of ``schema`` (a root object with ``$defs``)."""
    definitions: dict[str, Any] = schema.get("$defs", {})
    lines = [f"# {title}", "", intro, ""]
    lines += _section(schema.get("title", "Config"), schema, definitions, root=True)
    for name, definition in definitions.items():
        if definition.get("type") == "object" or "properties" in definition:
            lines += _section(name, definition, definitions, root=False)
    return "\n".join(lines).rstrip() + "\n"


def _section(
    name: str, schema: dict[str, Any], definitions: dict[str, Any], *, root: bool
) -> list[str]:
    lines = [f"## {name}" if not root else "## The file", ""]
    if schema.get("description"):
        lines += [_one_line(schema["description"]), ""]
    required = set(schema.get("required", ()))
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for field, spec in schema.get("properties", {}).items():
        default = (
            "required"
            if field in required
            else f"`{json.dumps(spec['default'])}`"
            if "default" in spec
            else "(its defaults)"
        )
        description = _one_line(spec.get("description", "")).replace("|", "\\|")
        lines.append(f"| `{field}` | {_type(spec, definitions)} | {default} | {description} |")
    return [*lines, ""]


def _type(spec: dict[str, Any], definitions: dict[str, Any]) -> str:
    if "$ref" in spec:
        name = spec["$ref"].removeprefix(_REF)
        target = definitions.get(name, {})
        return _values(target["enum"]) if "enum" in target else f"[{name}](#{name.lower()})"
    if "enum" in spec or "const" in spec:
        return _values(spec.get("enum", [spec.get("const")]))
    alternatives = spec.get("anyOf") or spec.get("oneOf")
    if alternatives:
        return " \\| ".join(dict.fromkeys(_type(each, definitions) for each in alternatives))
    kind = spec.get("type")
    if kind == "array":
        return f"list of {_type(spec.get('items', {}), definitions)}"
    extra = spec.get("additionalProperties")
    if kind == "object" and isinstance(extra, dict):
        return f"map of {_type(extra, definitions)}"
    return str(kind or "any")


def _values(values: list[Any]) -> str:
    return " \\| ".join(f"`{json.dumps(v)}`" for v in values)


def _one_line(text: str) -> str:
    return " ".join(text.split())
