"""Editing the agent's YAML config in place: RFC 7396 merge patches, comments and layout kept.

Pure code: text in, text out. The device side of ``set_config`` (validation, the crash-safe
write, applying it) is tested against a real agent in test_commands.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from edgefleet.agent.configfile import (
    ConfigFileError,
    apply_patch,
    merge_patch,
    merge_patch_between,
    replace_config,
)

# RFC 7396, Appendix A: (target, patch, result).
RFC_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]

COMMENTED = """\
# The door camera at the shop; edited by hand, keep the notes.
device_id: shop-7        # printed on the box
broker:
    host: mqtt.shop.lan  # the broker in the back office
    port: 1883

streams:
    # Entrance: people only.
    -   name: door
        source: {type: file, path: "door.mp4", loop: true}
        model:
            path: models/ssd.tflite   # COCO detector
        events:
            min_score: 0.5            # raised after false alarms
    -   name: shelf
        source:
            type: synthetic
        model:
            path: models/mobilenet.tflite
"""


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    """The (before, after) pairs of lines that differ; both texts must have as many lines."""
    old, new = before.splitlines(), after.splitlines()
    assert len(old) == len(new), f"line count changed:\n{after}"
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_EXAMPLES)
def test_merge_patch_gives_the_rfc_7396_results(target: Any, patch: Any, result: Any) -> None:
    assert merge_patch(copy.deepcopy(target), patch) == result


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=4)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)
NO_NULLS = st.recursive(
    st.booleans() | st.integers() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)


@given(
    st.dictionaries(st.text(max_size=3), JSON_VALUES),
    st.dictionaries(st.text(max_size=3), NO_NULLS),
)
def test_the_patch_between_two_documents_turns_the_first_into_the_second(
    old: dict[str, Any], new: dict[str, Any]
) -> None:
    # The one change no patch can say: a list of named items (or an empty one) that becomes
    # an object, since an object patches such a list by name. No config field does that.
    assume(not any(_named_list_to_object(old.get(k), v) for k, v in new.items()))

    patch = merge_patch_between(old, new)

    assert merge_patch(copy.deepcopy(old), patch) == new


NAMED_ITEMS = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["door", "shelf", "yard"])},
        optional={"events": NO_NULLS, "model": NO_NULLS},
    ),
    unique_by=lambda item: item["name"],
    max_size=3,
)


@given(NAMED_ITEMS, NAMED_ITEMS)
def test_the_patch_between_two_stream_lists_turns_the_first_into_the_second(
    old: list[dict[str, Any]], new: list[dict[str, Any]]
) -> None:
    patch = merge_patch_between({"streams": old}, {"streams": new})

    assert merge_patch({"streams": copy.deepcopy(old)}, patch) == {"streams": new}


def _named_list_to_object(old: Any, new: Any) -> bool:
    if isinstance(old, dict) and isinstance(new, dict):
        return any(_named_list_to_object(old.get(k), v) for k, v in new.items())
    named = isinstance(old, list) and all(isinstance(i, dict) and "name" in i for i in old)
    return named and isinstance(new, dict)


def test_an_empty_patch_leaves_the_text_exactly_as_it_was() -> None:
    assert apply_patch(COMMENTED, {}) == COMMENTED


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(COMMENTED, id="four-space-indent"),
        pytest.param(yaml.safe_dump(yaml.safe_load(COMMENTED)), id="pyyaml-layout"),
        pytest.param(
            yaml.safe_dump(yaml.safe_load(COMMENTED), indent=4, sort_keys=False),
            id="pyyaml-indent-4",
        ),
    ],
)
def test_a_patch_of_one_stream_value_changes_only_that_line(text: str) -> None:
    after = apply_patch(text, {"streams": {"door": {"events": {"min_score": 0.6}}}})

    [(before_line, after_line)] = changed_lines(text, after)
    assert before_line.replace("0.5", "0.6") == after_line
    assert yaml.safe_load(after)["streams"][0]["events"]["min_score"] == 0.6


def test_a_patch_keeps_every_comment_and_the_flow_style() -> None:
    after = apply_patch(COMMENTED, {"broker": {"port": 8883}, "device_id": "shop-8"})

    comment = "        # printed on the box"
    assert changed_lines(COMMENTED, after) == [
        (f"device_id: shop-7{comment}", f"device_id: shop-8{comment}"),
        ("    port: 1883", "    port: 8883"),
    ]


def test_null_removes_a_field_and_a_stream_by_name() -> None:
    after = apply_patch(COMMENTED, {"broker": {"port": None}, "streams": {"shelf": None}})

    data = yaml.safe_load(after)
    assert data["broker"] == {"host": "mqtt.shop.lan"}
    assert [s["name"] for s in data["streams"]] == ["door"]
    assert "# Entrance: people only." in after
    assert "# raised after false alarms" in after


def test_a_new_stream_name_appends_a_stream() -> None:
    after = apply_patch(
        COMMENTED, {"streams": {"yard": {"source": {"type": "synthetic"}, "model": {"path": "m"}}}}
    )

    streams = yaml.safe_load(after)["streams"]
    assert [s["name"] for s in streams] == ["door", "shelf", "yard"]
    assert streams[2] == {"name": "yard", "source": {"type": "synthetic"}, "model": {"path": "m"}}
    assert after.startswith(COMMENTED.rstrip("\n"))  # everything before is untouched


def test_a_list_in_a_patch_replaces_the_list_as_rfc_7396_says() -> None:
    streams = [{"name": "only", "source": {"type": "synthetic"}, "model": {"path": "m"}}]

    after = apply_patch(COMMENTED, {"streams": streams})

    assert yaml.safe_load(after)["streams"] == streams


@pytest.mark.parametrize("value", ["yes", "no", "on", "off", "0755", "1e3", "null", "12:30"])
def test_strings_that_yaml_1_1_reads_as_other_types_are_written_quoted(value: str) -> None:
    after = apply_patch(COMMENTED, {"device_id": value})

    assert yaml.safe_load(after)["device_id"] == value


def test_a_value_equal_to_the_one_written_keeps_its_quotes() -> None:
    after = apply_patch(COMMENTED, {"streams": {"door": {"source": {"path": "door.mp4"}}}})

    assert after == COMMENTED


def test_a_whole_config_rewrites_only_what_differs() -> None:
    config = yaml.safe_load(COMMENTED)
    config["streams"][1]["model"]["path"] = "models/mobilenet_v2.tflite"
    config["health"] = {"interval_s": 5}

    after = replace_config(COMMENTED, config)

    assert yaml.safe_load(after) == config
    assert changed_lines(COMMENTED, after.removesuffix("health:\n    interval_s: 5\n")) == [
        (
            "            path: models/mobilenet.tflite",
            "            path: models/mobilenet_v2.tflite",
        )
    ]


def test_a_whole_config_drops_the_fields_it_leaves_out_or_sets_null() -> None:
    config = yaml.safe_load(COMMENTED)
    del config["broker"]["host"]
    config["device_id"] = None

    after = yaml.safe_load(replace_config(COMMENTED, config))

    assert "device_id" not in after
    assert after["broker"] == {"port": 1883}


def test_a_whole_config_replaces_a_file_that_is_not_yaml() -> None:
    config = {"device_id": "d", "streams": []}

    assert yaml.safe_load(replace_config("device_id: [", config)) == config


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("device_id: [\n", "not valid YAML (expected the node content"),
        ("a: 1\na: 2\n", 'duplicate key "a"'),
        ("- a\n- b\n", "top level is not a mapping"),
        ("", "top level is not a mapping"),
    ],
)
def test_a_file_that_is_not_an_editable_config_is_an_error_naming_why(
    text: str, reason: str
) -> None:
    with pytest.raises(ConfigFileError) as raised:
        apply_patch(text, {"device_id": "d"})

    assert reason in raised.value.message
    assert "\n" not in raised.value.message
