"""The agent's config file changed in place: a JSON merge patch applied to the user's YAML.

``set_config`` edits the file the agent runs from. The text is read with ruamel.yaml's
round-trip loader, the patch (RFC 7396) is merged into that tree, and the tree is written
back with the file's own indentation, so the comments, key order, quoting and flow style of
everything the patch does not touch stay as the user wrote them. A whole new configuration
is first turned into the merge patch that leads from the file to it
(``merge_patch_between``), so it keeps the comments of every section it leaves alone.

RFC 7396 replaces a list whole. One extension: a list whose items are all mappings with a
``name`` (``streams``) also takes an object keyed by name; each entry merges into the item
of that name, null removes the item, and a name not in the list appends a new item.

Strings from a patch that YAML 1.1 (PyYAML, which the agent reads the file with) would take
for something else (``yes``, ``on``, ``0755``) are written quoted.

Pure: text in, text out; the caller reads and writes the file.

Errors::

    EdgefleetError
    └── ConfigFileError     the file's text is not YAML, or its top level is not a mapping
                            (bad input: the user's file)
"""

from __future__ import annotations

import io
from collections.abc import Mapping, MutableMapping, MutableSequence
from dataclasses import dataclass
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from edgefleet.runtime import EdgefleetError

# Long values (URLs, paths) are never folded onto a second line.
_NO_WRAP = 4096


class ConfigFileError(EdgefleetError):
    """The config file's text cannot be edited: it is not YAML or not a mapping."""


def apply_patch(text: str, patch: Mapping[str, Any]) -> str:
    """The YAML ``text`` with the merge ``patch`` applied, everything untouched kept as is."""
    tree = _load(text)
    merge_patch(tree, _quoted(patch))
    return _dump(tree, text)


def replace_config(text: str, config: Mapping[str, Any]) -> str:
    """The YAML ``text`` changed to say ``config``, keeping what is the same as it was.

    Null values in ``config`` drop the field (a merge patch cannot set a null), so it takes
    its default. A ``text`` that is not an editable config is replaced outright.
    """
    try:
        tree = _load(text)
    except ConfigFileError:
        return yaml.safe_dump(_without_nulls(config), sort_keys=False)
    merge_patch(tree, _quoted(merge_patch_between(tree, config)))
    return _dump(tree, text)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: ``target`` with ``patch`` applied; mappings in ``target`` change in place."""
    if not isinstance(patch, Mapping):
        return patch
    if _is_named_list(target):
        return _merge_named(target, patch)
    if not isinstance(target, MutableMapping):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
            continue
        old = target.get(key)
        merged = merge_patch(old, value)
        if merged is not old and not _same(old, merged):
            target[key] = merged  # an equal value stays as written (its quotes, its format)
    return target


def merge_patch_between(old: Any, new: Any) -> Any:
    """The merge patch that turns ``old`` into ``new`` (nulls in ``new`` drop the field).

    Two lists of the same named items in the same order give a patch keyed by name, so
    only the items that differ are rewritten.
    """
    if _same_names(old, new):
        return {
            item["name"]: merge_patch_between(before, item)
            for before, item in zip(old, new, strict=True)
            if not _same(before, item)
        }
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return _without_nulls(new)
    patch: dict[str, Any] = {key: None for key in old if new.get(key) is None}
    for key, value in new.items():
        if value is not None and not _same(old.get(key), value):
            patch[key] = merge_patch_between(old.get(key), value)
    return patch


def _same_names(old: Any, new: Any) -> bool:
    if not (_is_named_list(old) and _is_named_list(new)) or len(old) != len(new):
        return False
    names = [item["name"] for item in new]
    return [item["name"] for item in old] == names and len(set(names)) == len(names)


def _is_named_list(value: Any) -> bool:
    return isinstance(value, MutableSequence) and all(
        isinstance(item, Mapping) and "name" in item for item in value
    )


def _merge_named(items: MutableSequence[Any], patch: Mapping[str, Any]) -> MutableSequence[Any]:
    for name, value in patch.items():
        index = next((i for i, item in enumerate(items) if item.get("name") == name), None)
        if value is None:
            if index is not None:
                del items[index]
        elif index is None:
            items.append(merge_patch({"name": name}, value))
        else:
            merged = merge_patch(items[index], value)
            if merged is not items[index]:
                items[index] = merged
    return items


def _same(a: Any, b: Any) -> bool:
    """Equal, with ``True`` and ``1`` told apart (YAML writes them differently)."""
    return a is not None and isinstance(a, bool) == isinstance(b, bool) and a == b


def _without_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _quoted(value: Any) -> Any:
    """``value`` with every string that YAML 1.1 would read as another type marked for quotes."""
    if isinstance(value, Mapping):
        return {k: _quoted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_quoted(v) for v in value]
    if isinstance(value, str) and not isinstance(value, DoubleQuotedScalarString):
        try:
            plain = yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else DoubleQuotedScalarString(value)
    return value


def _load(text: str) -> CommentedMap:
    try:
        tree = _yaml(_Layout()).load(text)
    except YAMLError as exc:
        raise ConfigFileError(
            f"the config file is not valid YAML ({_reason(exc)})",
            hint="fix the file on the device, or send the whole configuration instead of a patch",
        ) from exc
    if not isinstance(tree, CommentedMap):
        raise ConfigFileError(
            "the config file's top level is not a mapping of fields",
            hint="send the whole configuration instead of a patch",
        )
    return tree


def _reason(exc: YAMLError) -> str:
    """The problem and where, on one line (the loader's own message spans several)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _dump(tree: CommentedMap, original: str) -> str:
    out = io.StringIO()
    writer = _yaml(_layout(tree))
    writer.explicit_start = original.lstrip().startswith("---")
    writer.dump(tree, out)
    return out.getvalue()


@dataclass(frozen=True)
class _Layout:
    """Block indentation, as ruamel.yaml counts it: ``offset`` is the dash's indent."""

    mapping: int = 2
    sequence: int = 2
    offset: int = 0


def _yaml(layout: _Layout) -> YAML:
    handler = YAML()  # round-trip: comments, order, quotes and flow style kept
    handler.preserve_quotes = True
    handler.width = _NO_WRAP
    handler.indent(mapping=layout.mapping, sequence=layout.sequence, offset=layout.offset)
    return handler


def _layout(tree: CommentedMap) -> _Layout:
    """The indentation the file uses, read from where the loader found its nested blocks."""
    mapping: int | None = None
    sequence: tuple[int, int] | None = None
    stack: list[Any] = [tree]
    while stack and (mapping is None or sequence is None):
        node = stack.pop()
        if isinstance(node, CommentedSeq):
            stack.extend(node)
            continue
        if not isinstance(node, CommentedMap):
            continue
        for key, value in node.items():
            stack.append(value)
            if not isinstance(value, CommentedMap | CommentedSeq) or not value:
                continue
            if value.fa.flow_style():
                continue
            key_col = node.lc.data[key][1]
            if isinstance(value, CommentedMap) and mapping is None:
                mapping = value.lc.col - key_col
            elif isinstance(value, CommentedSeq) and sequence is None:
                dash, item = value.lc.col - key_col, value.lc.data[0][1] - key_col
                sequence = (max(item, dash + 2), dash)
    default = _Layout()
    if mapping is None or mapping < 1:
        mapping = default.mapping
    seq, offset = sequence if sequence is not None else (default.sequence, default.offset)
    return _Layout(mapping=mapping, sequence=seq, offset=offset)
