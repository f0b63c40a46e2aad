"""Validating an update in a child process: real interpreter, real models, real crashes."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import pytest
import tflite_builder as tb
from conftest import Assets

from edgefleet.agent.protocol import Manifest, TaskSpec, TensorSpec
from edgefleet.agent.validation import (
    ValidationLimits,
    ValidationRefused,
    ValidationReport,
    validate_model,
)
from edgefleet.runtime import BackendName, CpuDelegate, EdgeTpuDelegate, ModelBytes
from edgefleet.runtime.preprocess import Frame

CHILD_MODULE = "edgefleet.agent.validation"
V1_INPUT = TensorSpec(shape=(1, 128, 128, 3), dtype="uint8")
V1_OUTPUT = TensorSpec(shape=(1, 1001), dtype="uint8")


@pytest.fixture(scope="module")
def mobilenet_v1(assets: Assets) -> bytes:
    """mobilenet_v1_0.25_128 (uint8, 128x128 in, 1001 classes out), read once."""
    return assets.model("mobilenet_v1_0.25_128_quant.tflite").read_bytes()


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """Every validation, passed or refused, leaves no child process behind."""
    yield
    assert validation_children() == []


def validation_children() -> list[psutil.Process]:
    """This process's validation children still alive (zombies included: they are not reaped)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if CHILD_MODULE in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def manifest_for(
    content: bytes,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec] | None = None,
    **fields: Any,
) -> Manifest:
    """A manifest for ``content`` with the given expectations (unsigned: validation reads it)."""
    now = time.time()
    return Manifest(
        model_id="mobilenet",
        version=1,
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
        artifact="model.tflite",
        urls=["https://models.example/model.tflite"],
        inputs=inputs,
        outputs=outputs,
        issued_at=now,
        expires_at=now + 3600,
        **fields,
    )


def validate(
    content: bytes, manifest: Manifest | None = None, *, frame: Frame | None = None, **kwargs: Any
) -> ValidationReport:
    """``validate_model`` on the CPU with the default backend."""
    options: dict[str, Any] = {
        "delegate": CpuDelegate(),
        "threads": None,
        "backend": BackendName.AUTO,
        **kwargs,
    }
    return validate_model(content, manifest=manifest, frame=frame, **options)


def refusal(content: bytes, manifest: Manifest | None = None, **kwargs: Any) -> ValidationRefused:
    """The refusal ``validate`` raises."""
    with pytest.raises(ValidationRefused) as caught:
        validate(content, manifest, **kwargs)
    return caught.value


def test_good_model_passes_with_its_real_tensors_and_a_positive_latency(
    mobilenet_v1: bytes, images: dict[str, Frame]
) -> None:
    manifest = manifest_for(
        mobilenet_v1, [V1_INPUT], [V1_OUTPUT], task=TaskSpec(task="classification", top_k=3)
    )

    report = validate(mobilenet_v1, manifest, frame=images["grace_hopper.bmp"], bench_runs=5)

    assert report.inputs == [V1_INPUT]
    assert report.outputs == [V1_OUTPUT]
    assert report.task == "classification"
    assert report.smoke_results == 3  # the manifest's top_k reached the child
    assert report.runs == 5
    assert 0 < report.latency_p50_ms <= report.latency_p90_ms
    assert report.backend.split()[0] in ("litert", "tflite-runtime")
    assert report.delegate == "cpu"


def test_without_manifest_the_task_is_detected_and_a_grey_frame_is_used(
    mobilenet_v1: bytes,
) -> None:
    report = validate(mobilenet_v1, None, bench_runs=3)

    assert report.task == "classification"
    assert report.smoke_results == 5  # the runtime's default top_k
    assert report.latency_p50_ms > 0


def test_truncated_model_is_refused_as_load_failed(mobilenet_v1: bytes) -> None:
    refused = refusal(mobilenet_v1[: len(mobilenet_v1) // 2])

    assert refused.code == "load_failed"
    assert "corrupt or truncated" in refused.message
    assert refused.hint


def test_edgetpu_model_on_the_cpu_is_refused_naming_the_edge_tpu(assets: Assets) -> None:
    refused = refusal(assets.edgetpu.read_bytes())

    assert refused.code == "load_failed"
    assert "Edge TPU" in refused.message


def test_edgetpu_delegate_settings_reach_the_child_and_a_missing_libedgetpu_is_load_failed(
    assets: Assets,
) -> None:
    refused = refusal(
        assets.edgetpu.read_bytes(),
        delegate=EdgeTpuDelegate(device="usb:0", library="libedgetpu-absent.so.1"),
    )

    assert refused.code == "load_failed"
    assert "edgetpu (usb:0)" in refused.message
    assert "libedgetpu-absent.so.1" in refused.message


def test_unresolvable_custom_op_is_refused_at_load_not_at_inference(assets: Assets) -> None:
    # The interpreter resolves ops when it prepares the nodes in allocate_tensors, so a
    # missing op stops the model at load time, before any smoke inference.
    refused = refusal(assets.invoking_error.read_bytes())

    assert refused.code == "load_failed"
    assert "fake-op-double" in refused.message


def test_input_shape_differing_from_manifest_is_refused_naming_both_shapes(
    mobilenet_v1: bytes,
) -> None:
    expected = TensorSpec(shape=(1, 224, 224, 3), dtype="uint8")

    refused = refusal(mobilenet_v1, manifest_for(mobilenet_v1, [expected]))

    assert refused.code == "input_mismatch"
    assert "expected [1, 224, 224, 3] uint8" in refused.message
    assert "found [1, 128, 128, 3] uint8" in refused.message


@pytest.mark.parametrize(
    "expected",
    [
        TensorSpec(shape=(1, 1001), dtype="float32"),
        TensorSpec(shape=(1, 1000), dtype="uint8"),
    ],
    ids=["dtype", "shape"],
)
def test_output_differing_from_manifest_is_refused(
    mobilenet_v1: bytes, expected: TensorSpec
) -> None:
    refused = refusal(mobilenet_v1, manifest_for(mobilenet_v1, [V1_INPUT], [expected]))

    assert refused.code == "output_mismatch"
    assert f"expected {list(expected.shape)} {expected.dtype}" in refused.message
    assert "found [1, 1001] uint8" in refused.message


SSD_INPUT = TensorSpec(shape=(1, 300, 300, 3), dtype="uint8")


def test_outputs_whose_shape_is_set_at_run_time_pass_when_the_manifest_says_null(
    ssd_model: ModelBytes,
) -> None:
    run_time = [TensorSpec(shape=None, dtype="float32")] * 4
    manifest = manifest_for(ssd_model.content, [SSD_INPUT], run_time)

    report = validate(ssd_model.content, manifest, bench_runs=2)

    assert report.task == "detection"
    assert [o.shape for o in report.outputs] == [(1, 10, 4), (1, 10), (1, 10), (1,)]


def test_an_output_set_at_run_time_still_has_its_dtype_checked(ssd_model: ModelBytes) -> None:
    outputs = [TensorSpec(shape=None, dtype="uint8")] + [
        TensorSpec(shape=None, dtype="float32")
    ] * 3

    refused = refusal(ssd_model.content, manifest_for(ssd_model.content, [SSD_INPUT], outputs))

    assert refused.code == "output_mismatch"
    assert "expected (shape set at run time) uint8, found [1, 10, 4] float32" in refused.message


def test_a_manifest_promising_scalars_for_run_time_outputs_is_refused_saying_how_to_fix_it(
    ssd_model: ModelBytes,
) -> None:
    scalars = [TensorSpec(shape=(), dtype="float32")] * 4

    refused = refusal(ssd_model.content, manifest_for(ssd_model.content, [SSD_INPUT], scalars))

    assert refused.code == "output_mismatch"
    assert "expected [] float32, found [1, 10, 4] float32" in refused.message
    assert "shape null" in refused.hint


def test_median_over_the_latency_budget_is_refused_as_too_slow(mobilenet_v1: bytes) -> None:
    manifest = manifest_for(mobilenet_v1, [V1_INPUT], max_latency_ms=0.0001)

    refused = refusal(mobilenet_v1, manifest, bench_runs=3)

    assert refused.code == "too_slow"
    assert "0.0001 ms" in refused.message
    assert "median invoke time" in refused.message


def test_frame_that_is_not_rgb_uint8_is_a_caller_bug(mobilenet_v1: bytes) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        validate(mobilenet_v1, frame=np.zeros((128, 128, 3), dtype=np.float32))


def test_child_killed_mid_run_is_reported_as_crashed_by_sigkill(
    assets: Assets, mobilenet_v1: bytes
) -> None:
    outcome: list[BaseException | ValidationReport] = []

    def run() -> None:
        # 100 000 runs of mobilenet_v2 take minutes: the kill lands long before the end.
        try:
            outcome.append(
                validate(assets.mobilenet_v2.read_bytes(), bench_runs=100_000, timeout_s=60)
            )
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run, name="validate-mobilenet-v2")
    runner.start()
    child = wait_for_loaded_child()
    child.kill()
    runner.join(timeout=30)

    assert not runner.is_alive()
    [refused] = outcome
    assert isinstance(refused, ValidationRefused)
    assert refused.code == "crashed"
    assert "SIGKILL" in refused.message
    # The parent goes on validating as before.
    assert validate(mobilenet_v1, bench_runs=1).task == "classification"


def wait_for_loaded_child(timeout_s: float = 30.0) -> psutil.Process:
    """The running validation child, once it has the interpreter library mapped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in validation_children():
            try:
                if any("interpreter" in m.path for m in child.memory_maps()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no validation child loaded an interpreter within {timeout_s} s")


def test_model_that_hangs_the_interpreter_times_out_and_its_process_is_gone() -> None:
    # The WHILE loop of this model never ends on a bright frame: a real hung invoke.
    hanging = tb.hang_when_bright_model(8, 8)
    white = np.full((8, 8, 3), 255, dtype=np.uint8)

    refused = refusal(hanging, frame=white, timeout_s=2.0)

    assert refused.code == "timeout"
    assert "within 2 s" in refused.message
    assert "killed" in refused.message
    assert validation_children() == []


# -- budgets ------------------------------------------------------------------------------

MIB = 1 << 20
BUDGET = ValidationLimits(memory_budget_bytes=128 * MIB, address_space_headroom_bytes=256 * MIB)


def test_tensors_over_the_memory_budget_are_refused_at_load_naming_the_budget() -> None:
    # 1,000,000 copies of 8x8x3 float32: a 732 MiB intermediate, over 128 + 256 MiB.
    refused = refusal(tb.tile_model(copies=1_000_000), limits=BUDGET)
    assert refused.code == "load_failed"
    assert "could not be allocated within the 128 MiB memory budget" in refused.message
    assert "it needs more than that" in refused.message


def test_a_model_that_grows_the_process_past_the_budget_is_too_big_with_its_figures() -> None:
    # 200,000 copies: 146 MiB, inside the address space, over the 128 MiB budget.
    refused = refusal(tb.tile_model(copies=200_000), limits=BUDGET)
    assert refused.code == "too_big"
    assert "more than the 128 MiB budget" in refused.message
    assert "peak RSS" in refused.message


def test_a_model_within_the_budget_reports_the_memory_it_added(mobilenet_v1: bytes) -> None:
    report = validate(mobilenet_v1, limits=BUDGET)
    assert 0 < report.memory_bytes < 128 * MIB
    assert report.peak_rss_bytes > report.memory_bytes


def test_a_model_past_its_cpu_time_is_stopped_and_refused_as_timeout() -> None:
    # Fifty million WHILE iterations an invoke: seconds of CPU, against a 1 s limit.
    endless = tb.slows_down_model(fast_invokes=0, loops=50_000_000)
    refused = refusal(endless, limits=ValidationLimits(cpu_s=1))
    assert refused.code == "timeout"
    assert "used up its 1 s of CPU time" in refused.message


def test_the_running_model_is_timed_in_the_same_process_when_given(
    mobilenet_v1: bytes, assets: Assets
) -> None:
    report = validate(assets.mobilenet_v2.read_bytes(), reference=mobilenet_v1)
    assert report.reference_p50_ms is not None
    assert report.reference_p50_ms > 0
    assert validate(mobilenet_v1).reference_p50_ms is None
