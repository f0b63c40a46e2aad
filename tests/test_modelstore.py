"""The model store: real files in tmp_path, real models, a real child process killed mid-write."""

from __future__ import annotations

import base64
import logging
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Assets

from edgefleet.agent.modelstore import (
    ModelNotStored,
    ModelStore,
    NothingToRollBack,
    Pointer,
    StoredModelCorrupt,
)
from edgefleet.agent.protocol import Manifest, SignedManifest, TensorSpec
from edgefleet.runtime import ModelBytes, read_model

CHILD_TIMEOUT_S = 30.0
KILLS = 30
MAX_KILL_DELAY_S = 0.05

# Adds and activates two models in turn forever; keep_previous=0 and prune() make every
# add() write the model again, so a kill lands in add, activate or prune alike.
CHURN = """
import sys
from pathlib import Path
from edgefleet.agent.modelstore import ModelStore
store = ModelStore(Path(sys.argv[1]), keep_previous=0)
models = [Path(name).read_bytes() for name in sys.argv[2:]]
print("ready", flush=True)
while True:
    for content in models:
        store.activate("cam", store.add(content))
        store.prune()
"""


@pytest.fixture(scope="session")
def small(assets: Assets) -> ModelBytes:
    """mobilenet_v1 0.25 (half a megabyte)."""
    return read_model(assets.model("mobilenet_v1_0.25_128_quant.tflite"))


@pytest.fixture(scope="session")
def large(assets: Assets) -> ModelBytes:
    """mobilenet_v2 1.0 (3.5 MB)."""
    return read_model(assets.mobilenet_v2)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Where the store lives."""
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> ModelStore:
    """An empty store in tmp_path."""
    return ModelStore(root)


def signed(model: ModelBytes, version: int = 1) -> SignedManifest:
    """A manifest of ``model`` (the store does not check signatures: a dummy one)."""
    manifest = Manifest(
        model_id="mobilenet",
        version=version,
        sha256=model.sha256,
        size=model.size,
        artifact="mobilenet.tflite",
        urls=["https://models.example/mobilenet.tflite"],
        inputs=[TensorSpec(shape=(1, 224, 224, 3), dtype="uint8")],
        issued_at=1_700_000_000.0,
        expires_at=1_900_000_000.0,
    )
    return SignedManifest(
        payload=manifest.model_dump_json(),
        key_id="fleet-1",
        signature=base64.b64encode(bytes(64)).decode(),
    )


def model_file(root: Path, sha256: str) -> Path:
    return root / "models" / sha256 / "model.tflite"


def flip_byte(path: Path, offset: int = 1000) -> None:
    """Corrupt one byte in place, as failing storage would."""
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0xFF]))


# -- models ------------------------------------------------------------------------------


def test_add_then_load_returns_the_same_bytes_verified(
    store: ModelStore, root: Path, large: ModelBytes
) -> None:
    sha256 = store.add(large.content)

    loaded = store.load(sha256)

    assert sha256 == large.sha256
    assert loaded.content == large.content
    assert loaded.sha256 == large.sha256
    assert loaded.source == str(model_file(root, sha256))


def test_add_is_idempotent(store: ModelStore, root: Path, small: ModelBytes) -> None:
    first = store.add(small.content)
    second = store.add(small.content)

    assert first == second == small.sha256
    assert [model.sha256 for model in store.models()] == [small.sha256]
    assert sorted(p.name for p in (root / "models").iterdir()) == [small.sha256]


def test_load_of_a_model_corrupted_on_disk_raises_stored_model_corrupt(
    store: ModelStore, root: Path, small: ModelBytes
) -> None:
    store.add(small.content)
    flip_byte(model_file(root, small.sha256))

    with pytest.raises(StoredModelCorrupt, match=small.sha256):
        store.load(small.sha256)


def test_has_is_false_for_a_model_corrupted_on_disk(
    store: ModelStore, root: Path, small: ModelBytes
) -> None:
    store.add(small.content)
    flip_byte(model_file(root, small.sha256))

    assert not ModelStore(root).has(small.sha256)


def test_add_repairs_a_model_corrupted_on_disk(
    store: ModelStore, root: Path, small: ModelBytes
) -> None:
    store.add(small.content, signed(small))
    flip_byte(model_file(root, small.sha256))

    store.add(small.content)

    assert store.load(small.sha256).content == small.content
    assert store.manifest(small.sha256) == signed(small)


def test_add_rejects_a_manifest_of_other_bytes(
    store: ModelStore, small: ModelBytes, large: ModelBytes
) -> None:
    with pytest.raises(ValueError, match="describes model"):
        store.add(small.content, signed(large))


def test_load_of_a_model_not_stored_raises_model_not_stored(
    store: ModelStore, small: ModelBytes
) -> None:
    with pytest.raises(ModelNotStored, match=small.sha256):
        store.load(small.sha256)


def test_manifest_returns_the_signed_manifest_stored_with_add(
    store: ModelStore, large: ModelBytes
) -> None:
    store.add(large.content, signed(large))

    assert store.manifest(large.sha256) == signed(large)


def test_manifest_is_none_for_a_model_added_without_one(
    store: ModelStore, small: ModelBytes
) -> None:
    store.add(small.content)

    assert store.manifest(small.sha256) is None


def test_adding_a_stored_model_with_a_manifest_stores_the_manifest(
    store: ModelStore, small: ModelBytes
) -> None:
    store.add(small.content)

    store.add(small.content, signed(small, version=2))

    assert store.manifest(small.sha256) == signed(small, version=2)


def test_models_lists_size_manifest_and_the_streams_running_each(
    store: ModelStore, small: ModelBytes, large: ModelBytes
) -> None:
    store.add(small.content)
    store.add(large.content, signed(large))
    store.activate("front", large.sha256)
    store.activate("back", large.sha256)

    listing = {model.sha256: model for model in store.models()}

    assert listing[large.sha256].size == large.size
    assert listing[large.sha256].manifest == signed(large)
    assert listing[large.sha256].streams == ["back", "front"]
    assert listing[small.sha256].streams == []


# -- pointers ----------------------------------------------------------------------------


def test_current_is_none_for_a_stream_never_activated(store: ModelStore) -> None:
    assert store.current("cam") is None


def test_activate_sets_the_current_model(store: ModelStore, small: ModelBytes) -> None:
    store.add(small.content)

    pointer = store.activate("cam", small.sha256)

    assert pointer == Pointer(small.sha256, ())
    assert store.current("cam") == pointer


def test_second_activate_puts_the_first_model_in_previous(
    store: ModelStore, small: ModelBytes, large: ModelBytes
) -> None:
    store.add(small.content)
    store.add(large.content)
    store.activate("cam", small.sha256)

    store.activate("cam", large.sha256)

    assert store.current("cam") == Pointer(large.sha256, (small.sha256,))


def test_keep_previous_caps_the_history(
    root: Path, small: ModelBytes, large: ModelBytes, assets: Assets
) -> None:
    store = ModelStore(root, keep_previous=1)
    third = read_model(assets.model("movenet_single_pose_lightning_ptq.tflite"))
    for model in (small, large, third):
        store.activate("cam", store.add(model.content))

    assert store.current("cam") == Pointer(third.sha256, (large.sha256,))


def test_activating_the_current_model_again_keeps_the_history(
    store: ModelStore, small: ModelBytes, large: ModelBytes
) -> None:
    for model in (small, large, large):
        store.activate("cam", store.add(model.content))

    assert store.current("cam") == Pointer(large.sha256, (small.sha256,))


def test_activate_of_a_model_not_stored_raises_model_not_stored(
    store: ModelStore, small: ModelBytes
) -> None:
    with pytest.raises(ModelNotStored):
        store.activate("cam", small.sha256)

    assert store.current("cam") is None


def test_rollback_returns_to_the_previous_model_and_drops_it_from_previous(
    store: ModelStore, small: ModelBytes, large: ModelBytes
) -> None:
    for model in (small, large):
        store.activate("cam", store.add(model.content))

    pointer = store.rollback("cam")

    assert pointer == Pointer(small.sha256, ())
    assert store.current("cam") == pointer


def test_rollback_without_a_previous_model_raises_nothing_to_roll_back(
    store: ModelStore, small: ModelBytes
) -> None:
    store.activate("cam", store.add(small.content))

    with pytest.raises(NothingToRollBack, match="cam"):
        store.rollback("cam")


def test_pointer_survives_a_new_store_instance(
    store: ModelStore, root: Path, small: ModelBytes, large: ModelBytes
) -> None:
    for model in (small, large):
        store.activate("cam", store.add(model.content))

    restarted = ModelStore(root)

    assert restarted.current("cam") == Pointer(large.sha256, (small.sha256,))
    assert restarted.load(large.sha256).content == large.content


def test_half_written_temporary_pointer_does_not_affect_current(
    store: ModelStore, root: Path, small: ModelBytes
) -> None:
    store.activate("cam", store.add(small.content))
    (root / "streams" / "cam" / "current.json.tmp-xyz").write_bytes(b'{"sha256": "ab')

    assert ModelStore(root).current("cam") == Pointer(small.sha256, ())


def test_damaged_pointer_with_nothing_to_rebuild_it_from_is_absent(
    store: ModelStore, root: Path, small: ModelBytes, caplog: pytest.LogCaptureFixture
) -> None:
    store.activate("cam", store.add(small.content))  # no manifest, no record, no history
    (root / "streams" / "cam" / "current.json").write_bytes(b"\x00\x17garbage")

    assert store.current("cam") is None
    assert "current.json" in caplog.text
    assert any(r.levelname == "ERROR" for r in caplog.records)


def test_damaged_pointer_is_rebuilt_from_the_committed_record(
    store: ModelStore,
    root: Path,
    small: ModelBytes,
    large: ModelBytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = store.add(large.content, signed(large, version=3))
    new = store.add(small.content, signed(small, version=2))  # lower version, but committed
    store.activate("cam", old)
    store.activate("cam", new)
    store.write_record("cam", {"state": "committed", "sha256": new, "version": 2})
    pointer = root / "streams" / "cam" / "current.json"
    assert (root / "streams" / "cam" / "current.json.prev").is_file()
    pointer.write_bytes(b'{"sha256": "zz')  # disk damage

    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.modelstore"):
        rebuilt = store.current("cam")

    assert rebuilt == Pointer(new, (old,))
    assert ModelStore(root).current("cam") == rebuilt  # written back, whole
    assert (root / "streams" / "cam" / "current.json.damaged").read_bytes() == b'{"sha256": "zz'
    assert any("committed update record" in r.getMessage() for r in caplog.records)


def test_damaged_pointer_without_a_record_takes_the_highest_verified_version(
    store: ModelStore, root: Path, small: ModelBytes, large: ModelBytes
) -> None:
    high = store.add(large.content, signed(large, version=5))
    low = store.add(small.content, signed(small, version=4))
    store.activate("cam", low)
    store.activate("cam", high)
    store.activate("cam", low)  # current.json.prev now names high, with low before it
    flip_byte(model_file(root, high))  # ...but high's bytes rotted: not verified
    (root / "streams" / "cam" / "current.json").write_bytes(b"")

    assert store.current("cam") == Pointer(low, ())


def test_damaged_pointer_skips_a_record_that_is_not_committed(
    store: ModelStore, root: Path, small: ModelBytes, large: ModelBytes
) -> None:
    first = store.add(small.content, signed(small, version=1))
    second = store.add(large.content, signed(large, version=2))
    store.activate("cam", first)
    store.activate("cam", second)
    store.write_record("cam", {"state": "probation", "sha256": second})
    store.rollback("cam")  # probation failed: back on first; prev names second
    (root / "streams" / "cam" / "current.json").write_bytes(b"\xff")

    # Not the model of the update that did not commit, although its version is higher.
    assert store.current("cam") == Pointer(first, ())


def test_stream_name_with_path_traversal_is_rejected(store: ModelStore) -> None:
    with pytest.raises(ValueError, match="stream name"):
        store.current("../x")


def test_sha256_with_path_traversal_is_rejected(store: ModelStore) -> None:
    with pytest.raises(ValueError, match="sha256"):
        store.load("../../etc")


# -- records -----------------------------------------------------------------------------


def test_record_roundtrips(store: ModelStore) -> None:
    record = {"state": "downloading", "sha256": "ab" * 32, "bytes_done": 1024}

    store.write_record("cam", record)

    assert store.read_record("cam") == record


def test_writing_none_deletes_the_record(store: ModelStore, root: Path) -> None:
    store.write_record("cam", {"state": "committed"})

    store.write_record("cam", None)

    assert store.read_record("cam") is None
    assert not (root / "streams" / "cam" / "update.json").exists()


# -- pruning and crash leftovers ---------------------------------------------------------


def test_prune_keeps_current_and_previous_models_of_every_stream_and_deletes_the_rest(
    root: Path, small: ModelBytes, large: ModelBytes, assets: Assets
) -> None:
    store = ModelStore(root, keep_previous=1)
    pose = read_model(assets.model("movenet_single_pose_lightning_ptq.tflite"))
    detector = read_model(assets.ssd)
    for model in (detector, small, large):  # detector falls out of the history
        store.activate("front", store.add(model.content))
    store.activate("back", store.add(pose.content))
    unused = store.add(read_model(assets.edgetpu).content)

    deleted = store.prune()

    assert sorted(deleted) == sorted([detector.sha256, unused])
    assert {model.sha256 for model in store.models()} == {
        small.sha256,
        large.sha256,
        pose.sha256,
    }


def test_prune_keeps_models_it_is_told_to_keep(store: ModelStore, small: ModelBytes) -> None:
    store.add(small.content)

    assert store.prune(keep=[small.sha256]) == []
    assert store.has(small.sha256)


def test_prune_removes_staging_files_of_stored_models_only(
    store: ModelStore, small: ModelBytes, large: ModelBytes
) -> None:
    store.activate("cam", store.add(small.content))
    store.staging_path(small.sha256).write_bytes(small.content)
    store.staging_path(large.sha256).write_bytes(large.content[:1000])

    store.prune()

    assert not store.staging_path(small.sha256).exists()
    assert store.staging_path(large.sha256).exists()


def test_leftover_temporary_model_directory_is_ignored_by_has_and_models(
    store: ModelStore, root: Path, small: ModelBytes
) -> None:
    leftover = root / "models" / ".tmp-crashed"
    leftover.mkdir()
    (leftover / "model.tflite").write_bytes(small.content[:1000])

    assert not store.has(small.sha256)
    assert store.models() == []


def test_prune_removes_a_leftover_temporary_model_directory(
    store: ModelStore, root: Path, small: ModelBytes
) -> None:
    leftover = root / "models" / ".tmp-crashed"
    leftover.mkdir()
    (leftover / "model.tflite").write_bytes(small.content[:1000])

    store.prune()

    assert not leftover.exists()


def test_every_moment_of_a_killed_writer_leaves_a_loadable_current_model(
    root: Path, small: ModelBytes, large: ModelBytes
) -> None:
    rng = random.Random()
    shas = {small.sha256, large.sha256}
    ModelStore(root)  # created once here, so a child killed while creating it is not a case
    activated = False
    for kill in range(KILLS):
        delay_s = rng.uniform(0, MAX_KILL_DELAY_S)
        run_and_kill(root, [small.source, large.source], delay_s)

        store = ModelStore(root)
        pointer = store.current("cam")

        context = f"kill {kill + 1}, {delay_s * 1000:.1f} ms into the loop"
        # None only until a first activate() has finished: after that a pointer is never lost.
        assert pointer is not None or not activated, f"{context}: the pointer was lost"
        if pointer is not None:
            activated = True
            assert pointer.sha256 in shas, context
            assert store.load(pointer.sha256).sha256 == pointer.sha256, context
        for model in store.models():  # no half-written model under a sha256 name
            assert store.load(model.sha256).sha256 == model.sha256, context


def run_and_kill(root: Path, model_paths: list[str], delay_s: float) -> None:
    """Start the CHURN loop on ``root``, let it run ``delay_s``, SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHURN, str(root), *model_paths],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stderr is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], CHILD_TIMEOUT_S)
        line = child.stdout.readline() if ready else b""
        if line != b"ready\n":
            child.kill()
            child.wait(CHILD_TIMEOUT_S)
            pytest.fail(f"the child did not start: {child.stderr.read().decode()}")
        time.sleep(delay_s)
    finally:
        child.kill()
        child.wait(CHILD_TIMEOUT_S)
        child.stdout.close()
        child.stderr.close()
