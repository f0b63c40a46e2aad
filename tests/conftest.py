"""Shared fixtures: the real models and images in ../shared/assets, and built models.

The assets live outside the repository (``$EDGEFLEET_ASSETS``, default
``../shared/assets`` beside the checkout). Where they are absent, tests that
need them skip with the reason; under CI (``CI`` set) that is a failure.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import Mosquitto, require_mosquitto
from controller_db import BACKENDS, controller_database

from edgefleet.agent.config import OPERATOR_ENV
from edgefleet.runtime import Labels, ModelBytes, load_image, read_model, select_backend
from edgefleet.runtime.preprocess import Frame

REPO = Path(__file__).resolve().parent.parent
ASSETS_ENV = "EDGEFLEET_ASSETS"


@dataclass(frozen=True)
class Assets:
    """Paths of the shared real models and images."""

    root: Path

    def model(self, name: str) -> Path:
        """A model file by name."""
        return self.root / "models" / name

    def image(self, name: str) -> Path:
        """An image file by name."""
        return self.root / "images" / name

    @property
    def ssd(self) -> Path:
        """The COCO SSD detector with TFLite_Detection_PostProcess."""
        return self.model("ssd_mobilenet_v1_coco_quant_postprocess.tflite")

    @property
    def coco_labels(self) -> Path:
        """The detector's label file (first line '???')."""
        return self.model("ssd_mobilenet_v1_coco_labels.txt")

    @property
    def mobilenet_v2(self) -> Path:
        """The 224x224 ImageNet classifier."""
        return self.model("mobilenet_v2_1.0_224_quant.tflite")

    @property
    def imagenet_labels(self) -> Path:
        """ImageNet labels, line 0 'background'."""
        return self.model("imagenet_labels.txt")

    @property
    def edgetpu(self) -> Path:
        """mobilenet_v1_0.25 compiled for the Edge TPU."""
        return self.model("mobilenet_v1_0.25_128_quant_edgetpu.tflite")

    @property
    def movenet(self) -> Path:
        """MoveNet Lightning single-pose."""
        return self.model("movenet_single_pose_lightning_ptq.tflite")

    @property
    def invoking_error(self) -> Path:
        """A model with the unresolvable custom op 'fake-op-double'."""
        return self.model("model_invoking_error.tflite")


@pytest.fixture(scope="session")
def assets() -> Assets:
    """The shared assets, or a skip (a failure under CI) naming where they were looked for."""
    root = Path(os.environ.get(ASSETS_ENV) or REPO.parent / "shared" / "assets")
    if not (root / "models").is_dir():
        reason = f"real models not found at {root}; set {ASSETS_ENV} to the shared assets folder"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run every test)")
        pytest.skip(reason)
    return Assets(root)


@pytest.fixture(scope="session")
def ssd_model(assets: Assets) -> ModelBytes:
    """The SSD detector's bytes, read once."""
    return read_model(assets.ssd)


@pytest.fixture(scope="session")
def coco_labels(assets: Assets) -> Labels:
    """COCO labels as the SSD example ships them."""
    return Labels.from_file(assets.coco_labels)


@pytest.fixture(scope="session")
def imagenet_labels(assets: Assets) -> Labels:
    """ImageNet labels."""
    return Labels.from_file(assets.imagenet_labels)


@pytest.fixture(scope="session")
def images(assets: Assets) -> dict[str, Frame]:
    """Every still image, decoded once, by file name."""
    return {
        name: load_image(assets.image(name))
        for name in ("grace_hopper.bmp", "cat.bmp", "parrot.jpg", "kite_and_cold.jpg")
    }


@pytest.fixture(scope="session")
def mosquitto_binary() -> Path:
    """The broker binary, or a skip naming the install command (a failure under CI)."""
    return require_mosquitto()


@pytest.fixture
def broker(tmp_path: Path, mosquitto_binary: Path) -> Iterator[Mosquitto]:
    """A running Mosquitto with the project's generated config on a free loopback port."""
    with Mosquitto(tmp_path / "broker") as running:
        yield running


@pytest.fixture(params=BACKENDS)
def controller_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty controller database, once on SQLite and once on PostgreSQL (a
    database of its own, dropped afterwards; a skip without a server, a failure under CI)."""
    with controller_database(request.param, tmp_path) as url:
        yield url


@dataclass(frozen=True)
class SmallFs:
    """A small ext4 filesystem loop-mounted at ``path``; ``fill`` and ``free`` its space."""

    path: Path

    @property
    def filler(self) -> Path:
        """The file that takes the free space."""
        return self.path / "filler"

    def fill(self, *, leave: int = 0) -> int:
        """Write ``filler`` until the filesystem says it is full (ENOSPC), then give ``leave``
        bytes back; returns the filler's size."""
        written = 0
        with self.filler.open("ab", buffering=0) as file:  # unbuffered: nothing left to flush
            for block in (1 << 20, 1 << 12, 1):
                chunk = b"\0" * block
                while True:
                    try:
                        written += file.write(chunk) or 0
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
            if leave:
                written = max(written - leave, 0)
                file.truncate(written)
            os.fsync(file.fileno())
        return written

    def free(self) -> None:
        """Delete ``filler``: the space is back."""
        self.filler.unlink(missing_ok=True)


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """A 24 MB ext4 filesystem mounted from a file; a skip (a failure under CI) if mounting
    is not permitted here (not root, no loop devices, a container without CAP_SYS_ADMIN)."""
    image = tmp_path / "fs.img"
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    with image.open("wb") as file:
        file.truncate(24 << 20)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    mounted = made if made.returncode else _run("mount", "-o", "loop", str(image), str(mountpoint))
    if mounted.returncode:
        reason = (
            f"cannot make and mount a small ext4 filesystem here "
            f"({(mounted.stderr or mounted.stdout).strip()}): run as root on a machine with "
            "loop devices (mkfs.ext4 from e2fsprogs, mount)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run every test)")
        pytest.skip(reason)
    try:
        yield SmallFs(mountpoint)
    finally:
        unmounted = _run("umount", str(mountpoint))
        if unmounted.returncode:  # a process still holds a file: detach, it goes when closed
            _run("umount", "-l", str(mountpoint))


def pytest_report_header() -> str:
    """Say which interpreter backend this run exercises."""
    return f"edgefleet backend: {select_backend().label}"


@pytest.fixture(scope="session", autouse=True)
def no_operator_profile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the developer's own operator profile and EDGEFLEET_* settings out of every test
    (and the commands they run): tests name their broker and profile themselves."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config-home")))
        for name in OPERATOR_ENV:
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    """Undo what a test did to the root logger (configure_logging, a command's -v, the
    controller's INFO): its handlers and level as they were, so no test logs for the next."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
