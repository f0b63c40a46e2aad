"""The ``edgefleet model`` commands, run as a user runs them: the installed console script."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Assets

from edgefleet.ops.cli import build_parser
from edgefleet.ops.profile import broker_profile
from edgefleet.runtime import BackendName, select_backend
from edgefleet.runtime.engine import _native_stderr_to_log

pytestmark = pytest.mark.backend

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
BAD_INPUT = 2  # the model, an image or an option is at fault
FAILED = 1  # this machine lacks something


def edgefleet(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGEFLEET), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def assert_clean_failure(
    result: subprocess.CompletedProcess[str], *phrases: str, code: int = BAD_INPUT
) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert "edgefleet: error:" in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


def test_run_json_lists_person_and_tie_on_grace_hopper(assets: Assets) -> None:
    result = edgefleet(
        "model", "run", assets.ssd, assets.image("grace_hopper.bmp"),
        "--labels", assets.coco_labels, "--json",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert {"image", "task", "backend", "latency_ms", "detections"} <= record.keys()
    assert record["task"] == "detection"
    assert record["backend"].startswith(("litert ", "tflite-runtime "))
    assert record["latency_ms"] > 0
    best = {}
    for d in record["detections"]:
        assert set(d) == {"label", "class_id", "score", "box"}
        assert len(d["box"]) == 4
        best[d["label"]] = max(best.get(d["label"], 0), d["score"])
    assert best["person"] >= 0.6
    assert best["tie"] >= 0.6


def test_run_json_prints_one_line_per_image(assets: Assets) -> None:
    result = edgefleet(
        "model", "run", assets.ssd, assets.image("cat.bmp"), assets.image("parrot.jpg"),
        "--labels", assets.coco_labels, "--json",
    )  # fmt: skip

    records = json_lines(result.stdout)
    assert [Path(r["image"]).name for r in records] == ["cat.bmp", "parrot.jpg"]
    assert records[0]["detections"][0]["label"] == "cat"
    assert records[1]["detections"][0]["label"] == "bird"


def test_run_classifier_gives_macaw_with_index_label_score(assets: Assets) -> None:
    result = edgefleet(
        "model", "run", assets.mobilenet_v2, assets.image("parrot.jpg"),
        "--labels", assets.imagenet_labels, "--json",
    )  # fmt: skip

    (record,) = json_lines(result.stdout)
    assert record["task"] == "classification"
    assert record["classes"][0] == {
        "index": 89,
        "label": "macaw",
        "score": pytest.approx(0.996, abs=0.01),
    }


def test_run_movenet_gives_17_named_keypoints(assets: Assets) -> None:
    result = edgefleet("model", "run", assets.movenet, assets.image("grace_hopper.bmp"), "--json")

    (record,) = json_lines(result.stdout)
    assert record["task"] == "pose"
    assert len(record["keypoints"]) == 17
    assert set(record["keypoints"][0]) == {"name", "x", "y", "score"}


def test_run_text_output_names_backend_and_labels(assets: Assets) -> None:
    result = edgefleet(
        "model", "run", assets.ssd, assets.image("cat.bmp"), "--labels", assets.coco_labels
    )

    assert result.returncode == 0
    assert "detection" in result.stdout
    assert "cat" in result.stdout
    assert "cpu" in result.stdout


def test_inspect_flags_the_edgetpu_model(assets: Assets) -> None:
    text = edgefleet("model", "inspect", assets.edgetpu)
    as_json = edgefleet("model", "inspect", assets.edgetpu, "--json")

    assert "compiled for the Coral Edge TPU" in text.stdout
    assert json.loads(as_json.stdout)["edgetpu_compiled"] is True


def test_run_edgetpu_model_without_tpu_fails_cleanly(assets: Assets) -> None:
    result = edgefleet("model", "run", assets.edgetpu, assets.image("parrot.jpg"))

    assert_clean_failure(result, "Edge TPU", "libedgetpu1-std", "--delegate edgetpu")


def test_run_model_with_unknown_custom_op_fails_cleanly(assets: Assets) -> None:
    result = edgefleet("model", "run", assets.invoking_error, assets.image("cat.bmp"))

    assert_clean_failure(result, "fake-op-double")


def test_run_truncated_model_fails_cleanly(assets: Assets, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(assets.ssd.read_bytes()[:100_000])

    assert_clean_failure(
        edgefleet("model", "run", truncated, assets.image("cat.bmp")),
        "corrupt or truncated",
        "download the file again",
    )


def test_run_text_file_fails_cleanly(assets: Assets, tmp_path: Path) -> None:
    text = tmp_path / "model.tflite"
    text.write_text("not a model\n" * 10)

    assert_clean_failure(
        edgefleet("model", "run", text, assets.image("cat.bmp")), "not a TensorFlow Lite model"
    )


def test_run_missing_model_fails_cleanly(assets: Assets, tmp_path: Path) -> None:
    assert_clean_failure(
        edgefleet("model", "run", tmp_path / "nope.tflite", assets.image("cat.bmp")), "no such file"
    )


def test_run_missing_edgetpu_library_fails_cleanly(assets: Assets) -> None:
    result = edgefleet(
        "model", "run", assets.mobilenet_v2, assets.image("cat.bmp"), "--delegate", "edgetpu:usb"
    )

    assert_clean_failure(result, "libedgetpu.so.1", "install the Edge TPU runtime", code=FAILED)


def test_bad_image_is_reported_and_the_other_images_still_run(assets: Assets) -> None:
    result = edgefleet(
        "model",
        "run",
        assets.mobilenet_v2,
        assets.imagenet_labels,
        assets.image("parrot.jpg"),
        "--json",
    )

    assert_clean_failure(result, "cannot read as an image")
    (record,) = json_lines(result.stdout)
    assert record["classes"][0]["label"] == "macaw"


def test_bench_json_reports_what_benchmark_model_does(assets: Assets) -> None:
    result = edgefleet(
        "model", "bench", assets.model("mobilenet_v1_0.25_128_quant.tflite"),
        "--runs", 20, "--warmup", 2, "--threads", 2, "--json",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["runs"] == 20
    assert report["threads"] == 2
    assert report["delegate"] == "cpu"
    assert report["backend"].startswith(("litert ", "tflite-runtime "))
    assert report["load_ms"] > 0
    assert report["first_inference_ms"] > 0
    assert (
        report["min_ms"]
        <= report["p50_ms"]
        <= report["p90_ms"]
        <= report["p99_ms"]
        <= report["max_ms"]
    )
    assert report["inferences_per_s"] > 0
    assert report["peak_rss_mb"] > 10


def test_bench_rejects_zero_runs_as_a_usage_error(assets: Assets) -> None:
    result = edgefleet("model", "bench", assets.ssd, "--runs", 0)

    assert result.returncode == 2
    assert "must be at least 1" in result.stderr


# -- one convention for every command ---------------------------------------------------------

SMALL = "mobilenet_v1_0.25_128_quant.tflite"


def test_model_run_and_bench_print_no_interpreter_banner_unless_verbose(assets: Assets) -> None:
    model, image = assets.model(SMALL), assets.image("cat.bmp")

    run = edgefleet("model", "run", model, image)
    bench = edgefleet("model", "bench", model, "--runs", 2, "--warmup", 0)
    verbose_after = edgefleet("model", "run", model, image, "-v")
    verbose_before = edgefleet("-v", "model", "run", model, image)

    assert run.returncode == bench.returncode == 0, run.stderr + bench.stderr
    assert "Egyptian cat" in run.stdout
    assert "latency ms" in bench.stdout
    assert run.stderr == ""
    assert bench.stderr == ""
    for verbose in (verbose_after, verbose_before):
        assert verbose.returncode == 0, verbose.stderr
        assert not [line for line in verbose.stderr.splitlines() if line.startswith("INFO:")]
        # LiteRT announces XNNPACK once per process; tflite-runtime 2.14 says nothing.
        if select_backend().name is BackendName.LITERT:
            assert (
                "DEBUG edgefleet.runtime.engine: interpreter: INFO: Created TensorFlow Lite "
                "XNNPACK delegate" in verbose.stderr
            )


def test_native_output_other_than_info_still_reaches_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with _native_stderr_to_log():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"ERROR: a real problem\n")
        os.write(2, b"WARNING: and a warning\n")

    err = capfd.readouterr().err
    assert "XNNPACK" not in err
    assert "ERROR: a real problem\n" in err
    assert "WARNING: and a warning\n" in err


def test_the_same_mistake_exits_2_in_every_command(assets: Assets, tmp_path: Path) -> None:
    missing = tmp_path / "missing.tflite"
    text = tmp_path / "notes.tflite"
    text.write_text("not a model\n" * 10)
    (tmp_path / "fleet.key").write_text("not a key\n")
    image = assets.image("cat.bmp")

    for model in (missing, text):
        commands = [
            ("model", "inspect", model),
            ("model", "run", model, image),
            ("model", "bench", model),
            ("manifest", "create", model, "--model-id", "m", "--version", 1,
             "--url", "https://x/m", "--key", tmp_path / "fleet.key"),
            ("transfer", "publish", model, "--port", 1),
            ("deploy", "dev1", "door", model, "--port", 1),
            ("manifest", "verify", model, "--keys-dir", tmp_path),
        ]  # fmt: skip
        for command in commands:
            result = edgefleet(*command)
            assert result.returncode == BAD_INPUT, (command, result.stderr)
            assert "Traceback" not in result.stderr
            assert "edgefleet: error:" in result.stderr, (command, result.stderr)


def _options(
    parser: argparse.ArgumentParser, path: str = "edgefleet"
) -> Iterator[tuple[str, argparse.Action, str]]:
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif action.option_strings and action.help is not None:
            yield path, action, formatter._get_help_string(action) or ""  # type: ignore[attr-defined]


def test_every_option_help_states_its_default() -> None:
    flags = (argparse._StoreTrueAction, argparse._HelpAction, argparse._VersionAction)
    missing = [
        f"{path} {action.option_strings[-1]}: {text}"
        for path, action, text in _options(build_parser())
        if not isinstance(action, flags) and not action.required and "default" not in text
    ]
    assert missing == []


@pytest.mark.parametrize(
    "command",
    [
        ["deploy", "d", "s", "m.json"],
        ["undeploy", "d", "s"],
        ["cmd", "d", "ping"],
        ["transfer", "publish", "m.tflite"],
        ["transfer", "clear", "0" * 64],
        ["watch"],
    ],
)
def test_every_broker_command_takes_host_port_and_topic_root_with_one_default(
    command: list[str], tmp_path: Path
) -> None:
    parser = build_parser()
    no_profile = {"HOME": str(tmp_path)}  # no profile file, no EDGEFLEET_* variable
    defaults = broker_profile(parser.parse_args(command), no_profile).profile
    given = parser.parse_args([*command, "--host", "h", "--port", "1884", "--topic-root", "r/v1"])
    insecure = broker_profile(parser.parse_args([*command, "--insecure"]), no_profile).profile

    assert (defaults.host, defaults.broker_port, defaults.topic_root) == (
        "localhost", 8883, "edgefleet/v1"
    )  # fmt: skip
    assert insecure.broker_port == 1883
    given_profile = broker_profile(given, no_profile).profile
    assert (given_profile.host, given_profile.broker_port, given_profile.topic_root) == (
        "h", 1884, "r/v1"
    )  # fmt: skip


def test_verbose_goes_before_or_after_the_command() -> None:
    parser = build_parser()

    assert parser.parse_args(["-v", "keys", "list", "d"]).verbose is True
    assert parser.parse_args(["keys", "list", "d", "-v"]).verbose is True
    assert parser.parse_args(["keys", "list", "d"]).verbose is False
    assert parser.parse_args(["cmd", "d", "ping", "--verbose"]).verbose is True


def test_a_reader_that_stops_early_ends_the_command_quietly(assets: Assets) -> None:
    # `| head -1`: the pipe closes after the first line, long before the last image.
    images = [str(assets.image("cat.bmp"))] * 200
    command = [str(EDGEFLEET), "model", "run", str(assets.model(SMALL)), *images]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as run:
        assert run.stdout is not None
        run.stdout.readline()
        run.stdout.close()  # the reader is gone
        _, stderr = run.communicate(timeout=120)

    assert run.returncode == 141
    assert b"Traceback" not in stderr
    assert b"BrokenPipeError" not in stderr
