"""The controller database on both backends, for tests: a SQLite file or a fresh PostgreSQL
database.

PostgreSQL is the server at ``$EDGEFLEET_TEST_POSTGRES`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``, trust auth): each test gets its own
``edgefleet_test_<random>`` database, dropped afterwards. A server that cannot be reached skips
the PostgreSQL half with the reason; under CI (``CI`` set) that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from edgefleet.agent.protocol import (
    HealthMessage,
    ModelRef,
    MqttHealth,
    OutboxHealth,
    ReportedState,
    StatusMessage,
    StreamHealth,
    SystemHealth,
    UpdateReport,
    UpdateState,
)

POSTGRES_ENV = "EDGEFLEET_TEST_POSTGRES"
POSTGRES_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")
_CONNECT_TIMEOUT_S = 5


def postgres_admin_url() -> str:
    """The URL of the server's maintenance database that test databases are made from."""
    return os.environ.get(POSTGRES_ENV) or POSTGRES_DEFAULT


def _admin_connection() -> psycopg.Connection:
    url = make_url(postgres_admin_url())
    try:
        return psycopg.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password,
            dbname=url.database or "postgres",
            autocommit=True,
            connect_timeout=_CONNECT_TIMEOUT_S,
        )
    except psycopg.OperationalError as exc:
        reason = (
            f"no PostgreSQL at {url.render_as_string(hide_password=True)} ({exc}); start one "
            f"or set {POSTGRES_ENV}"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run every test)")
        pytest.skip(reason)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, by URL; dropped on leaving."""
    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(postgres_admin_url()).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with _admin_connection() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def controller_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on ``backend`` (sqlite: a file under ``tmp_path``)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.sqlite3'}"
        return
    with postgres_database() as url:
        yield url


# -- device messages, as agents send them ---------------------------------------------


def model_ref(version: str = "1", *, sha256: str = "a" * 64) -> ModelRef:
    """The SSD detector at ``version``."""
    return ModelRef(
        id="ssd", version=version, sha256=sha256, task="detection", backend="litert 2.3.0",
        delegate="cpu",
    )  # fmt: skip


def status_message(
    device: str, ts: float, state: str = "online", *, reason: str | None = None
) -> StatusMessage:
    """A birth (online, one stream 'door' running the detector), degraded, or offline status."""
    online = state != "offline"
    return StatusMessage.model_validate(
        {
            "state": state, "device_id": device, "ts": ts, "reason": reason,
            "agent_version": "0.1.0",
            "capabilities": {
                "backends": ["litert 2.3.0"], "tasks": ["detection"], "sources": ["file"],
                "delegates": ["cpu"],
            } if online else None,
            "models": [model_ref().model_dump()] if online else [],
            "streams": ["door"] if online else [],
        }
    )  # fmt: skip


def health_message(
    device: str,
    ts: float,
    *,
    uptime_s: float = 60.0,
    fps: float = 15.0,
    processed: int = 890,
    failed: int = 0,
    stream_state: str = "running",
    temperature_c: float | None = 51.5,
) -> HealthMessage:
    """A heartbeat with one stream 'door'."""
    stream = StreamHealth(
        state=stream_state, captured=processed + 10, processed=processed, skipped=10,
        failed=failed, events=40,
        events_lost=0, fps=fps, latency_p50_ms=21.0, latency_p99_ms=35.0,
        inference_p50_ms=8.0, inference_p99_ms=11.0, source_failures=0,
    )  # fmt: skip
    return HealthMessage(
        device_id=device, ts=ts, uptime_s=uptime_s, streams={"door": stream},
        outbox=OutboxHealth(depth=3, dropped=1, not_stored=2, lost=1),
        mqtt=MqttHealth(connected=True, reconnects=2, published=40),
        system=SystemHealth(
            cpu_percent=40.0, rss_mb=110.0, cpu_temperature_c=temperature_c,
            throttled={"under_voltage": False, "throttled": True}, load_1m=0.7,
        ),
        models=[model_ref()],
    )  # fmt: skip


def reported_message(
    device: str,
    ts: float,
    *,
    version: str = "1",
    sha256: str = "a" * 64,
    update: UpdateState | None = None,
    reason: str | None = None,
) -> ReportedState:
    """What a device runs on stream 'door', with its latest update when given."""
    updates = {}
    if update is not None:
        updates["door"] = UpdateReport(
            state=update, model_id="ssd", version=int(version) + 1, sha256="b" * 64,
            reason=reason, ts=ts,
        )  # fmt: skip
    return ReportedState(
        device_id=device, ts=ts, agent_version="0.1.0", desired_revision=1,
        models={"door": model_ref(version, sha256=sha256)}, updates=updates,
    )  # fmt: skip
