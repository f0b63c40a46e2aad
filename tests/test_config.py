"""The agent's config file: validation with the field and the file named, env overrides, schema."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from agentproc import AGENT
from conftest import Assets

from edgefleet.agent.config import ConfigError, load_config


def valid(assets: Assets) -> dict:
    return {
        "device_id": "shop-1",
        "streams": [
            {
                "name": "front",
                "source": {"type": "synthetic"},
                "model": {"path": str(assets.ssd), "labels": str(assets.coco_labels)},
            }
        ],
    }


def write(tmp_path: Path, data: object, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AGENT), "check-config", str(path)], capture_output=True, text=True, check=False
    )


def test_valid_config_loads_with_defaults(assets: Assets, tmp_path: Path) -> None:
    config = load_config(write(tmp_path, valid(assets)), environ={})

    assert config.broker.client_id == "edgefleet-shop-1"
    assert config.broker.protocol == "mqtt5"
    assert config.streams[0].events.min_score == 0.5
    assert config.outbox.max_events == 100_000


def test_check_config_accepts_the_packaged_example_shape(assets: Assets, tmp_path: Path) -> None:
    result = check_config(write(tmp_path, valid(assets)))

    assert result.returncode == 0, result.stderr
    assert "ok (1 stream(s), device shop-1)" in result.stdout


def _broken(assets: Assets) -> list[tuple[str, object, str]]:
    """(what, config, the line check-config must print), one per kind of mistake."""
    base = valid(assets)

    def edit(path: str, value: object) -> dict:
        data = json.loads(json.dumps(base))
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
        return data

    return [
        ("missing device id", edit("device_id", _DELETE), "device_id: Field required"),
        ("misspelt section", edit("brokr", {"host": "x"}), "brokr: unknown field"),
        ("port not a number", edit("broker", {"port": "eighty"}), "broker.port: Input should be a valid integer"),
        ("port out of range", edit("broker", {"port": 70000}), "broker.port: Input should be less than or equal to 65535"),
        ("unknown source type", edit("streams.0.source", {"type": "webcam"}), "streams[0].source: Input tag 'webcam'"),
        ("score above 1", edit("streams.0.events", {"min_score": 1.5}), "streams[0].events.min_score: Input should be less than or equal to 1"),
        ("zone of two points", edit("streams.0.events", {"zones": [{"name": "z", "polygon": [[0, 0], [1, 1]]}]}), "streams[0].events.zones[0].polygon"),
        ("device id with a slash", edit("device_id", "shop/1"), "device_id: String should match pattern"),
        ("no streams", edit("streams", []), "streams: List should have at least 1 item"),
        ("model file absent", edit("streams.0.model.path", "missing.tflite"), "streams[0].model.path: no such file"),
        ("bad delegate device", edit("streams.0.model.delegate", {"type": "edgetpu", "device": "wifi"}), "streams[0].model.delegate.device: String should match pattern"),
        ("not YAML", "device_id: [unclosed\n", "not valid YAML"),
        ("not a mapping", "- just\n- a list\n", "the top level must be a mapping"),
    ]  # fmt: skip


_DELETE = object()


def test_check_config_names_the_file_field_and_reason_for_each_mistake(
    assets: Assets, tmp_path: Path
) -> None:
    for i, (what, data, expected) in enumerate(_broken(assets)):
        path = write(tmp_path, data, f"broken{i}.yaml")

        result = check_config(path)

        assert result.returncode == 2, what
        assert "Traceback" not in result.stderr, what
        assert f"{path}: {expected}" in result.stderr, f"{what}: {result.stderr}"


def test_every_problem_is_reported_at_once(assets: Assets, tmp_path: Path) -> None:
    data = valid(assets)
    data["broker"] = {"port": "x", "keepalive_s": 1}
    data["streams"][0]["events"] = {"min_score": 2}

    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data), environ={})

    assert len(caught.value.problems) == 3


def test_environment_overrides_nested_fields(assets: Assets, tmp_path: Path) -> None:
    environ = {
        "EDGEFLEET_DEVICE_ID": "shop-9",
        "EDGEFLEET_BROKER__PORT": "8883",
        "EDGEFLEET_STREAMS__0__MODEL__THREADS": "4",
        "EDGEFLEET_BACKEND": "litert",  # the runtime's own variable, not a config field
    }

    config = load_config(write(tmp_path, valid(assets)), environ=environ)

    assert config.device_id == "shop-9"
    assert config.broker.port == 8883
    assert config.streams[0].model.threads == 4


def test_bad_environment_override_names_the_variable(assets: Assets, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker\.port"):
        load_config(write(tmp_path, valid(assets)), environ={"EDGEFLEET_BROKER__PORT": "many"})
    with pytest.raises(ConfigError, match="environment EDGEFLEET_STREAMS__5__NAME"):
        load_config(write(tmp_path, valid(assets)), environ={"EDGEFLEET_STREAMS__5__NAME": "x"})


def test_relative_paths_resolve_against_the_config_file(assets: Assets, tmp_path: Path) -> None:
    data = valid(assets)
    data["streams"][0]["model"]["path"] = "models/m.tflite"
    data["streams"][0]["source"] = {"type": "file", "path": "clips/a.mp4"}

    config = load_config(write(tmp_path, data), environ={})

    assert config.streams[0].model.path == tmp_path / "models" / "m.tflite"
    assert config.streams[0].source.path == tmp_path / "clips" / "a.mp4"  # type: ignore[union-attr]


def test_duplicate_stream_names_are_refused(assets: Assets, tmp_path: Path) -> None:
    data = valid(assets)
    data["streams"].append(data["streams"][0])

    with pytest.raises(ConfigError, match="stream names must be unique: front repeated"):
        load_config(write(tmp_path, data), environ={})


def test_schema_command_prints_the_json_schema() -> None:
    result = subprocess.run([str(AGENT), "schema"], capture_output=True, text=True, check=True)

    schema = json.loads(result.stdout)
    assert {"device_id", "broker", "streams", "outbox"} <= set(schema["properties"])
    assert schema["properties"]["device_id"]["description"] == "This device's id."


def test_version_flag_prints_the_version() -> None:
    result = subprocess.run([str(AGENT), "--version"], capture_output=True, text=True, check=True)

    assert result.stdout.strip()[0].isdigit()


def test_packaged_example_config_is_valid_apart_from_its_files() -> None:
    example = Path(__file__).resolve().parent.parent / "packaging" / "agent.example.yaml"

    config = load_config(example, environ={})

    assert config.streams[0].source.type == "v4l2"
    assert config.broker.tls is not None
