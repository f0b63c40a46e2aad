"""Models over the broker: `edgefleet transfer` on the controller, `fetch_over_mqtt` on devices.

A real Mosquitto with the generated config, the agent's own ``MqttLink`` connected to it, and
the real model. Publications the CLI would never make (half of one, a forged meta or chunk)
are cut by the CLI's own ``model_chunks`` and published by a probe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from broker import Mosquitto, MqttProbe, Received
from conftest import Assets
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from edgefleet.agent.chunks import fetch_over_mqtt
from edgefleet.agent.config import BrokerSettings
from edgefleet.agent.download import (
    DownloadFailed,
    DownloadHashMismatch,
    DownloadIncomplete,
    DownloadTooLarge,
)
from edgefleet.agent.mqtt import MqttLink
from edgefleet.agent.protocol import (
    TOPIC_ROOT,
    ChunkedModelMeta,
    Topics,
    model_chunk_topic,
    model_meta_topic,
    model_transfer_topic,
)
from edgefleet.ops.cli import main
from edgefleet.ops.fleet import model_chunks
from edgefleet.runtime import ModelBytes, read_model

MODEL = "mobilenet_v1_0.25_128_quant.tflite"
CHUNK_BYTES = 16 * 1024  # 33 chunks of the 525,598-byte model: room to cut it in parts
FETCH_TIMEOUT_S = 5.0
SHORT_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def model(assets: Assets) -> ModelBytes:
    """The real model's bytes."""
    return read_model(assets.model(MODEL))


@pytest.fixture(scope="module")
def cut(model: ModelBytes) -> tuple[ChunkedModelMeta, list[bytes]]:
    """The model cut as ``transfer publish --chunk-kib 16`` cuts it."""
    return model_chunks(model.content, CHUNK_BYTES)


@pytest.fixture
def link(broker: Mosquitto) -> Iterator[MqttLink]:
    """A device's broker link, connected."""
    settings = BrokerSettings(host=broker.host, port=broker.port, client_id="dev1")
    device = MqttLink(settings, will_topic=Topics("dev1").status, will_payload=b"")
    device.start()
    assert device.wait_connected(5)
    yield device
    device.stop()


def transfer(broker: Mosquitto, *args: object) -> int:
    """``edgefleet transfer ARGS --host --port --insecure`` against the plain test broker."""
    options = ["--host", broker.host, "--port", str(broker.port), "--insecure"]
    return main(["transfer", *map(str, args), *options])


def publish(
    broker: Mosquitto,
    sha256: str,
    chunks: Iterable[tuple[int, bytes]] = (),
    meta: ChunkedModelMeta | bytes | None = None,
) -> None:
    """Publish chunks by index, then a meta (a model or raw bytes), retained, as the controller."""
    with MqttProbe(broker, "controller") as controller:
        for index, chunk in chunks:
            controller.publish(model_chunk_topic(TOPIC_ROOT, sha256, index), chunk, retain=True)
        if meta is not None:
            payload = meta if isinstance(meta, bytes) else meta.model_dump_json().encode()
            controller.publish(model_meta_topic(TOPIC_ROOT, sha256), payload, retain=True)


def some(chunks: list[bytes], indexes: Iterable[int]) -> list[tuple[int, bytes]]:
    return [(index, chunks[index]) for index in indexes]


def retained_under(broker: Mosquitto, sha256: str) -> list[Received]:
    """What a new subscriber to the model's subtree receives (everything retained there)."""
    marker = "marker/after-retained"
    with MqttProbe(broker, "observer") as observer:
        observer.subscribe(f"{model_transfer_topic(TOPIC_ROOT, sha256)}/#")
        observer.subscribe(marker)
        observer.publish(marker, b"after")
        observer.wait_for_message(marker)
        return [m for m in observer.messages() if m.topic != marker]


def fetch(link: MqttLink, model: ModelBytes, staging: Path, **options: Any) -> bytes:
    options.setdefault("timeout_s", FETCH_TIMEOUT_S)
    return fetch_over_mqtt(
        link, TOPIC_ROOT, sha256=model.sha256, size=model.size, staging=staging, **options
    )


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """Where the fetch stages the model (its directory does not exist yet)."""
    return tmp_path / "staging" / "model.part"


# -- the wire format -------------------------------------------------------------------------


@given(content=st.binary(min_size=1, max_size=4000), chunk_bytes=st.integers(1, 600))
def test_a_cut_model_is_its_chunks_in_order_each_as_long_as_the_meta_says(
    content: bytes, chunk_bytes: int
) -> None:
    meta, chunks = model_chunks(content, chunk_bytes)

    assert b"".join(chunks) == content
    assert [meta.chunk_length(i) for i in range(meta.chunks)] == [len(c) for c in chunks]
    assert ChunkedModelMeta.model_validate_json(meta.model_dump_json()) == meta


def test_a_meta_whose_chunk_count_does_not_cover_its_size_does_not_parse() -> None:
    with pytest.raises(ValidationError, match="make 3 chunks, not 2"):
        ChunkedModelMeta(sha256="ab" * 32, size=10, chunk_bytes=4, chunks=2)


# -- the controller publishes, the device fetches ------------------------------------------


def test_transfer_publish_prints_the_sha256_the_url_and_how_to_remove_it(
    broker: Mosquitto, assets: Assets, model: ModelBytes, capsys: pytest.CaptureFixture[str]
) -> None:
    code = transfer(broker, "publish", assets.model(MODEL))

    out = capsys.readouterr().out
    assert code == 0
    assert f"{model.size:,} bytes in 9 chunks of 64 KiB" in out
    assert f"sha256  {model.sha256}" in out
    assert "url     mqtt:" in out
    assert f"edgefleet transfer clear {model.sha256} --host {broker.host}" in out


def test_model_published_before_the_device_subscribed_arrives_byte_for_byte(
    broker: Mosquitto, assets: Assets, model: ModelBytes, link: MqttLink, staging: Path
) -> None:
    assert transfer(broker, "publish", assets.model(MODEL)) == 0
    progress: list[int] = []

    content = fetch(link, model, staging, on_progress=progress.append)

    assert content == model.content
    assert staging.read_bytes() == model.content
    assert len(progress) == 9
    assert progress[-1] == model.size


def test_transfer_completes_when_the_rest_of_the_chunks_come_after_the_fetch_started(
    broker: Mosquitto,
    model: ModelBytes,
    cut: tuple[ChunkedModelMeta, list[bytes]],
    link: MqttLink,
    staging: Path,
) -> None:
    meta, chunks = cut
    half = meta.chunks // 2
    publish(broker, meta.sha256, some(chunks, range(half)), meta)
    halfway = threading.Event()

    def on_progress(done: int) -> None:
        if done >= half * CHUNK_BYTES:
            halfway.set()

    with ThreadPoolExecutor(1) as pool:
        fetching = pool.submit(fetch, link, model, staging, on_progress=on_progress)
        assert halfway.wait(FETCH_TIMEOUT_S)
        publish(broker, meta.sha256, some(chunks, range(half, meta.chunks)))
        content = fetching.result(FETCH_TIMEOUT_S)

    assert content == model.content


def test_fetch_after_a_stopped_one_receives_every_chunk_again(
    broker: Mosquitto,
    model: ModelBytes,
    cut: tuple[ChunkedModelMeta, list[bytes]],
    link: MqttLink,
    staging: Path,
) -> None:
    meta, chunks = cut
    half = meta.chunks // 2
    publish(broker, meta.sha256, some(chunks, range(half)), meta)
    stop = threading.Event()
    with pytest.raises(DownloadFailed, match="stopped") as stopped:
        fetch(link, model, staging, stop=stop, on_progress=lambda _: stop.set())
    publish(broker, meta.sha256, some(chunks, range(half, meta.chunks)))

    content = fetch(link, model, staging)

    assert not stopped.value.permanent
    assert content == model.content


# -- transfers that cannot finish -----------------------------------------------------------


def test_missing_chunks_end_in_download_incomplete_naming_how_many_arrived(
    broker: Mosquitto,
    model: ModelBytes,
    cut: tuple[ChunkedModelMeta, list[bytes]],
    link: MqttLink,
    staging: Path,
) -> None:
    meta, chunks = cut
    publish(broker, meta.sha256, some(chunks, range(meta.chunks - 2)), meta)

    with pytest.raises(DownloadIncomplete) as incomplete:
        fetch(link, model, staging, timeout_s=SHORT_TIMEOUT_S)

    assert "31 of 33 chunks arrived" in incomplete.value.message
    assert "edgefleet transfer publish MODEL" in incomplete.value.hint
    assert incomplete.value.url == "mqtt:"
    assert not staging.exists()


def test_a_model_nobody_published_ends_in_download_incomplete_without_a_meta(
    model: ModelBytes, link: MqttLink, staging: Path
) -> None:
    with pytest.raises(DownloadIncomplete, match=r"no meta arrived \(0 chunks did\)"):
        fetch(link, model, staging, timeout_s=SHORT_TIMEOUT_S)


# -- publications that are wrong -------------------------------------------------------------


def test_a_meta_claiming_another_size_is_refused_for_good(
    broker: Mosquitto,
    model: ModelBytes,
    cut: tuple[ChunkedModelMeta, list[bytes]],
    link: MqttLink,
    staging: Path,
) -> None:
    meta, chunks = cut
    bigger = meta.model_copy(update={"size": model.size + 1})
    publish(broker, meta.sha256, some(chunks, range(meta.chunks)), bigger)

    with pytest.raises(DownloadFailed) as refused:
        fetch(link, model, staging)

    assert refused.value.permanent
    assert f"{model.size + 1:,} bytes; the manifest says" in refused.value.message
    assert not staging.exists()


def test_a_malformed_meta_is_refused_naming_the_problem(
    broker: Mosquitto, model: ModelBytes, link: MqttLink, staging: Path
) -> None:
    publish(broker, model.sha256, meta=b'{"size": "big"}')

    with pytest.raises(DownloadFailed, match="malformed: sha256: Field required") as refused:
        fetch(link, model, staging)

    assert refused.value.permanent


def test_a_chunk_altered_on_the_broker_fails_the_hash_and_the_staging_file_goes(
    broker: Mosquitto,
    assets: Assets,
    model: ModelBytes,
    cut: tuple[ChunkedModelMeta, list[bytes]],
    link: MqttLink,
    staging: Path,
) -> None:
    meta, chunks = cut
    assert transfer(broker, "publish", assets.model(MODEL), "--chunk-kib", 16) == 0
    altered = bytes(byte ^ 0xFF for byte in chunks[3])
    publish(broker, meta.sha256, [(3, altered)])

    with pytest.raises(DownloadHashMismatch, match=f"expected sha256 {model.sha256}"):
        fetch(link, model, staging)

    assert not staging.exists()


@pytest.mark.parametrize("extra", ["index-past-the-last", "chunk-longer-than-its-place"])
def test_bytes_beyond_the_manifest_are_refused(
    broker: Mosquitto,
    model: ModelBytes,
    cut: tuple[ChunkedModelMeta, list[bytes]],
    link: MqttLink,
    staging: Path,
    extra: str,
) -> None:
    meta, chunks = cut
    # The last chunk is held back, so the fetch cannot finish before the extra bytes come.
    forged = (meta.chunks, b"x" * 10) if extra == "index-past-the-last" else (0, chunks[0] + b"x")
    publish(broker, meta.sha256, [*some(chunks, range(1, meta.chunks - 1)), forged], meta)

    with pytest.raises(DownloadTooLarge, match="more than the manifest's"):
        fetch(link, model, staging)

    assert not staging.exists()


# -- the controller's side -------------------------------------------------------------------


def test_transfer_clear_leaves_nothing_for_a_new_subscriber(
    broker: Mosquitto, assets: Assets, model: ModelBytes, capsys: pytest.CaptureFixture[str]
) -> None:
    assert transfer(broker, "publish", assets.model(MODEL)) == 0
    assert len(retained_under(broker, model.sha256)) == 10

    code = transfer(broker, "clear", model.sha256)

    assert code == 0
    assert "the meta and 9 chunks (10 retained messages)" in capsys.readouterr().out
    assert retained_under(broker, model.sha256) == []


def test_transfer_clear_of_a_model_not_published_says_so(
    broker: Mosquitto, model: ModelBytes, capsys: pytest.CaptureFixture[str]
) -> None:
    code = transfer(broker, "clear", model.sha256)

    assert code == 1
    assert "nothing is published under" in capsys.readouterr().err


def test_publishing_again_cut_another_way_leaves_no_chunk_of_the_first_cut(
    broker: Mosquitto, assets: Assets, model: ModelBytes
) -> None:
    assert transfer(broker, "publish", assets.model(MODEL), "--chunk-kib", 16) == 0

    assert transfer(broker, "publish", assets.model(MODEL), "--chunk-kib", 64) == 0

    retained = {m.topic: m.payload for m in retained_under(broker, model.sha256)}
    meta = ChunkedModelMeta.model_validate_json(
        retained[model_meta_topic(TOPIC_ROOT, model.sha256)]
    )
    assert meta.chunks == 9
    assert set(retained) == {
        model_meta_topic(TOPIC_ROOT, model.sha256),
        *(model_chunk_topic(TOPIC_ROOT, model.sha256, i) for i in range(9)),
    }


def test_transfer_publish_refuses_a_chunk_the_broker_would_not_accept(
    broker: Mosquitto, assets: Assets, capsys: pytest.CaptureFixture[str]
) -> None:
    code = transfer(broker, "publish", assets.model(MODEL), "--chunk-kib", 1024)

    err = capsys.readouterr().err
    assert code == 2
    assert "the broker accepts packets up to 1,048,576" in err
    assert "use --chunk-kib 1023 or less" in err
