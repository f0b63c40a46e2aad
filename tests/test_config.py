"""The agent's config file: validation with the field and the file named, env overrides, schema."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from agentproc import AGENT
from conftest import REPO, Assets

from edgefleet.agent.cli import build_parser
from edgefleet.agent.config import OPERATOR_ENV, ConfigError, load_config
from edgefleet.agent.config import check_config as check_config_file


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


def check_config(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return agent_cli("check-config", str(path), *args)


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AGENT), *args], capture_output=True, text=True, check=False)


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


def test_the_operators_variables_in_the_same_shell_are_not_the_agents(
    assets: Assets, tmp_path: Path
) -> None:
    environ = {
        "EDGEFLEET_HOST": "mqtt.example",  # edgefleet watch/deploy's broker, not broker.host
        "EDGEFLEET_PROFILE": "/home/op/operator.yaml",
        "EDGEFLEET_FLEET": "/srv/fleet",
        "EDGEFLEET_INSECURE": "1",
    }

    config = load_config(write(tmp_path, valid(assets)), environ=environ)

    assert config.broker.host == load_config(write(tmp_path, valid(assets)), environ={}).broker.host


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


@pytest.mark.parametrize(
    ("command", "document"),
    [
        ([str(AGENT), "schema", "--markdown"], "agent-config-reference.md"),
        ([str(AGENT.with_name("edgefleet")), "controller", "schema", "--markdown"],
         "controller-config-reference.md"),
    ],
)  # fmt: skip
def test_the_config_references_in_docs_are_the_generated_ones(
    command: list[str], document: str
) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=True)

    published = (REPO / "docs" / document).read_text()
    assert published == result.stdout, f"regenerate: {' '.join(command[-3:])} > docs/{document}"


def test_the_agent_reference_has_a_row_for_every_field_of_every_section() -> None:
    from edgefleet.agent.config import json_schema

    schema = json_schema()
    published = (REPO / "docs" / "agent-config-reference.md").read_text()
    for definition in [schema, *schema["$defs"].values()]:
        for field in definition.get("properties", {}):
            assert f"| `{field}` |" in published


def test_every_variable_the_operator_tools_read_is_not_taken_for_an_agent_setting() -> None:
    read = {
        name
        for path in (REPO / "ops").rglob("*.py")
        for name in re.findall(r"\bEDGEFLEET_[A-Z_]*[A-Z]\b", path.read_text())
    }

    assert read
    assert read - OPERATOR_ENV == set()


def test_version_flag_prints_the_version() -> None:
    result = subprocess.run([str(AGENT), "--version"], capture_output=True, text=True, check=True)

    assert result.stdout.strip()[0].isdigit()


def test_packaged_example_config_is_valid_apart_from_its_files() -> None:
    example = Path(__file__).resolve().parent.parent / "packaging" / "agent.example.yaml"

    config = load_config(example, environ={})

    assert config.streams[0].source.type == "v4l2"
    assert config.broker.tls is not None


# check-config checks what the agent will open


def problem_lines(result: subprocess.CompletedProcess[str], path: Path) -> list[str]:
    """The ``FILE: location: reason`` lines check-config printed."""
    return [
        line.strip() for line in result.stderr.splitlines() if line.strip().startswith(f"{path}: ")
    ][1:]


def test_check_config_refuses_a_model_path_that_is_a_text_file(
    assets: Assets, tmp_path: Path
) -> None:
    notes = tmp_path / "model.tflite"
    notes.write_text("these are my notes, not a model\n" * 4)
    data = valid(assets)
    data["streams"][0]["model"]["path"] = str(notes)

    result = check_config(write(tmp_path, data))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "streams[0].model.path: " in result.stderr
    assert "not a TensorFlow Lite model" in result.stderr
    assert "ok" not in result.stdout


def test_check_config_refuses_a_video_file_that_does_not_exist(
    assets: Assets, tmp_path: Path
) -> None:
    data = valid(assets)
    data["streams"][0]["source"] = {"type": "file", "path": "clips/door.mp4"}

    result = check_config(write(tmp_path, data))

    assert result.returncode == 2
    assert f"streams[0].source.path: no such file {tmp_path / 'clips' / 'door.mp4'}" in (
        result.stderr
    )


def test_check_config_lists_schema_errors_and_missing_files_in_one_run(
    assets: Assets, tmp_path: Path
) -> None:
    data = valid(assets)
    data["device_id"] = "shop/1"
    data["broker"] = {"port": "x", "keepalive_s": 1}
    data["logging"] = {"levle": "DEBUG"}
    data["streams"][0]["events"] = {"min_score": 2}
    data["streams"][0]["model"]["path"] = "missing.tflite"
    data["streams"].append(
        {
            "name": "yard",
            "source": {"type": "file", "path": "yard.mp4"},
            "model": {"path": str(assets.ssd), "labels": "labels.txt"},
        }
    )
    path = write(tmp_path, data)

    result = check_config(path)

    assert result.returncode == 2
    lines = problem_lines(result, path)
    assert [line.split(": ")[1] for line in lines] == [
        "device_id",
        "broker.port",
        "broker.keepalive_s",
        "streams[0].events.min_score",
        "logging.levle",
        "streams[0].model.path",
        "streams[1].model.labels",
        "streams[1].source.path",
    ], result.stderr
    assert f"streams[0].model.path: no such file {tmp_path / 'missing.tflite'}" in result.stderr
    assert "8 problem(s) in the configuration" in result.stderr


def test_check_config_inspects_every_model_without_running_it(
    assets: Assets, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(assets.ssd.read_bytes()[:5000])
    data = valid(assets)
    data["streams"][0]["model"]["path"] = str(truncated)
    data["streams"].append(
        {
            "name": "coral",
            "source": {"type": "synthetic"},
            "model": {"path": str(assets.edgetpu)},  # compiled for the Edge TPU, cpu delegate
        }
    )

    with pytest.raises(ConfigError) as caught:
        check_config_file(write(tmp_path, data), environ={})

    first, second = caught.value.problems
    assert first.startswith("streams[0].model.path: ")
    assert "corrupt or truncated" in first
    assert second.startswith("streams[1].model.path: ")
    assert "compiled for the Coral Edge TPU" in second


def test_check_config_checks_image_folders_camera_nodes_and_label_files(
    assets: Assets, tmp_path: Path
) -> None:
    not_text = tmp_path / "labels.bin"
    not_text.write_bytes(bytes(range(128, 256)))
    data = valid(assets)
    data["streams"][0]["source"] = {"type": "images", "folder": "frames"}
    data["streams"][0]["model"]["labels"] = str(not_text)
    data["streams"].append(
        {
            "name": "usb",
            "source": {"type": "v4l2", "device": "/dev/video-not-here"},
            "model": {"path": str(assets.mobilenet_v2)},
        }
    )

    with pytest.raises(ConfigError) as caught:
        check_config_file(write(tmp_path, data), environ={})

    assert [p.split(": ")[0] for p in caught.value.problems] == [
        "streams[0].model.labels",
        "streams[0].source.folder",
        "streams[1].source.device",
    ]
    assert "cannot read label file" in caught.value.problems[0]
    assert f"no such folder {tmp_path / 'frames'}" in caught.value.problems[1]
    assert "no such device /dev/video-not-here" in caught.value.problems[2]


def test_check_config_verbose_lists_what_it_checked(assets: Assets, tmp_path: Path) -> None:
    result = check_config(write(tmp_path, valid(assets)), "-v")

    assert result.returncode == 0, result.stderr
    assert f"stream front: model {assets.ssd}, synthetic source" in result.stdout


# One command line convention


def test_check_config_and_run_take_the_config_as_an_option_or_an_argument(
    assets: Assets, tmp_path: Path
) -> None:
    path = write(tmp_path, valid(assets))

    as_option = agent_cli("check-config", "--config", str(path))
    as_argument = agent_cli("check-config", str(path))
    verbose_first = agent_cli("-v", "check-config", "-c", str(path))
    parsed = [
        build_parser().parse_args(args)
        for args in (
            ["run", "--config", "a.yaml"],
            ["run", "a.yaml", "-v"],
            ["-v", "run", "-c", "a.yaml"],
        )
    ]

    assert as_option.returncode == as_argument.returncode == 0, as_option.stderr
    assert as_option.stdout == as_argument.stdout
    assert verbose_first.returncode == 0, verbose_first.stderr
    assert "stream front" in verbose_first.stdout
    assert [(a.config or a.config_file, a.verbose) for a in parsed] == [
        (Path("a.yaml"), False),
        (Path("a.yaml"), True),
        (Path("a.yaml"), True),
    ]


def test_a_missing_or_doubled_config_is_a_usage_error_naming_the_option(tmp_path: Path) -> None:
    missing = agent_cli("run")
    doubled = agent_cli("check-config", "--config", "a.yaml", "b.yaml")

    assert missing.returncode == doubled.returncode == 2
    assert "the config file is required: --config FILE" in missing.stderr
    assert "two config files given (a.yaml and b.yaml)" in doubled.stderr
    assert "Traceback" not in missing.stderr + doubled.stderr


def test_every_option_of_every_command_states_its_default() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    undocumented = [
        f"{name} {action.option_strings[0]}"
        for name, sub in [("edgefleet-agent", parser), *commands.items()]
        for action in sub._actions
        if action.option_strings
        and action.dest not in ("help", "version")
        and "default" not in (action.help or "")
    ]

    assert undocumented == []
