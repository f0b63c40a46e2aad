"""The controller's storage: SQLAlchemy 2 models, sessions, and Alembic migrations on open.

SQLite is the default (a file path or ``sqlite:///PATH``): one file, WAL journal, foreign
keys on, a busy timeout, set on every connection. PostgreSQL is the option for bigger fleets
(``postgresql+psycopg://USER@HOST:PORT/DB``). :func:`open_database` migrates the schema to the
code's head before anything reads it, and refuses a database that a newer edgefleet migrated
(it would not know that schema).

Times are Unix seconds as floats (``Double``), as on the wire (``agent/protocol.py``):
comparable without time zones on both backends.

Tables here: the device registry (``devices``, ``device_streams``, ``groups``,
``group_members``, ``device_tags``) and ``audit_log``. Other concerns (releases, rollouts)
add their own: a model class on :class:`Base` in their module, and a revision file in
``migrations/versions/`` whose ``down_revision`` is the head before it (``0001_registry``
first). :func:`migrate` upgrades to every head, so revisions made side by side still run.

Errors::

    SettingError (bad input, exit 2)
    └── DatabaseUrlError        a URL or path that names no database we can use
    EnvironmentProblem (exit 1)
    └── DatabaseError           the database cannot be reached or migrated
        └── DatabaseTooNew      migrated by a newer edgefleet: refused, nothing changed

Threads: none of its own. An engine is shared by threads; a :class:`~sqlalchemy.orm.Session`
belongs to the thread that opened it (``Database.session()``).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, RevisionStep
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import (
    JSON,
    Boolean,
    Double,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    attribute_keyed_dict,
    mapped_column,
    relationship,
    sessionmaker,
)

from edgefleet.runtime import EnvironmentProblem, SettingError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 5_000
ID_LENGTH = 64  # a device id or stream name: one topic level (TOPIC_LEVEL_PATTERN)
NAME_LENGTH = 64
TAG_VALUE_LENGTH = 128
_TEXT_LENGTH = 1_024

# Constraint names that are the same on every backend, so later revisions can drop them.
_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class DatabaseUrlError(SettingError):
    """A database URL or path that names no database the controller can use."""


class DatabaseError(EnvironmentProblem):
    """The database cannot be reached, or its schema cannot be brought up to date."""


class DatabaseTooNew(DatabaseError):
    """The database was migrated by a newer edgefleet than this one."""


class Base(DeclarativeBase):
    """The declarative base of every controller table (one ``MetaData``)."""

    metadata = MetaData(naming_convention=_NAMING)


class Device(Base):
    """One device and its latest facts, from its status, health and reported state.

    Each fact group keeps the device's own timestamp of the message it came from
    (``status_ts``, ``health_ts``, ``reported_ts``): an older message does not overwrite it.
    """

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    first_seen: Mapped[float] = mapped_column(Double)
    last_seen: Mapped[float] = mapped_column(Double, index=True)

    # status (retained: birth, last will, orderly shutdown)
    status: Mapped[str | None] = mapped_column(String(16), index=True)  # online/degraded/offline
    status_reason: Mapped[str | None] = mapped_column(Text)
    status_ts: Mapped[float | None] = mapped_column(Double)
    online_since: Mapped[float | None] = mapped_column(Double)
    offline_since: Mapped[float | None] = mapped_column(Double)
    agent_version: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    backends: Mapped[list[str] | None] = mapped_column(JSON)  # e.g. ["litert 2.3.0"]
    capabilities: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    # health (periodic)
    health_ts: Mapped[float | None] = mapped_column(Double)
    started_at: Mapped[float | None] = mapped_column(Double)  # health ts - uptime_s
    uptime_s: Mapped[float | None] = mapped_column(Double)
    cpu_percent: Mapped[float | None] = mapped_column(Double)
    rss_mb: Mapped[float | None] = mapped_column(Double)
    load_1m: Mapped[float | None] = mapped_column(Double)
    temperature_c: Mapped[float | None] = mapped_column(Double)
    throttled: Mapped[bool | None] = mapped_column(Boolean)  # any throttling flag set
    throttled_flags: Mapped[dict[str, bool] | None] = mapped_column(JSON)
    outbox_depth: Mapped[int | None] = mapped_column(Integer)
    events_dropped: Mapped[int | None] = mapped_column(Integer)  # outbox full
    events_lost: Mapped[int | None] = mapped_column(Integer)  # not stored + lost to damage
    outbox_problem: Mapped[str | None] = mapped_column(Text)
    mqtt_reconnects: Mapped[int | None] = mapped_column(Integer)
    mqtt_problem: Mapped[str | None] = mapped_column(Text)
    clock_synchronised: Mapped[bool | None] = mapped_column(Boolean)
    parts_failing: Mapped[list[str] | None] = mapped_column(JSON)  # parts not running
    certificate_days_left: Mapped[float | None] = mapped_column(Double)

    # reported state (retained)
    reported_ts: Mapped[float | None] = mapped_column(Double)
    desired_revision: Mapped[int | None] = mapped_column(Integer)

    streams: Mapped[dict[str, DeviceStream]] = relationship(
        collection_class=attribute_keyed_dict("stream"),
        cascade="all, delete-orphan",
        back_populates="device",
    )
    tags: Mapped[dict[str, DeviceTag]] = relationship(
        collection_class=attribute_keyed_dict("key"),
        cascade="all, delete-orphan",
        back_populates="device",
    )


class DeviceStream(Base):
    """One stream of a device: the model it runs, its update, its health, what is desired."""

    __tablename__ = "device_streams"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    stream: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    device: Mapped[Device] = relationship(back_populates="streams")

    # the model running (reported state, else status/health)
    model_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    model_version: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    model_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    task: Mapped[str | None] = mapped_column(String(32))
    backend: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    delegate: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    model_since: Mapped[float | None] = mapped_column(Double)  # first message naming it
    # the health counters when it started running (its own frames are the ones above)
    model_processed_base: Mapped[int | None] = mapped_column(Integer)
    model_failed_base: Mapped[int | None] = mapped_column(Integer)

    # the model before it, and its figures when it was replaced (rollout health gates)
    previous_model_sha256: Mapped[str | None] = mapped_column(String(64))
    previous_error_rate: Mapped[float | None] = mapped_column(Double)  # failed / processed
    previous_latency_p99_ms: Mapped[float | None] = mapped_column(Double)

    # the latest update (reported state)
    update_state: Mapped[str | None] = mapped_column(String(16), index=True)
    update_reason: Mapped[str | None] = mapped_column(Text)
    update_model_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    update_version: Mapped[int | None] = mapped_column(Integer)
    update_sha256: Mapped[str | None] = mapped_column(String(64))
    update_ts: Mapped[float | None] = mapped_column(Double)

    # health of the stream (counters since the agent started)
    state: Mapped[str | None] = mapped_column(String(16))  # running, degraded, ...
    fps: Mapped[float | None] = mapped_column(Double)
    latency_p50_ms: Mapped[float | None] = mapped_column(Double)
    latency_p99_ms: Mapped[float | None] = mapped_column(Double)
    inference_p50_ms: Mapped[float | None] = mapped_column(Double)
    inference_p99_ms: Mapped[float | None] = mapped_column(Double)
    processed: Mapped[int | None] = mapped_column(Integer)
    failed: Mapped[int | None] = mapped_column(Integer)
    skipped: Mapped[int | None] = mapped_column(Integer)
    events_lost: Mapped[int | None] = mapped_column(Integer)
    source_failures: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)

    # what the controller wants here (set by releases/rollouts): a differing model is stale
    desired_model_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    desired_version: Mapped[int | None] = mapped_column(Integer)
    desired_sha256: Mapped[str | None] = mapped_column(String(64))


class Group(Base):
    """A named set of devices (``group:NAME``)."""

    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    created_at: Mapped[float] = mapped_column(Double)


class GroupMember(Base):
    """A device in a group."""

    __tablename__ = "group_members"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class DeviceTag(Base):
    """One ``key=value`` tag of a device (``tag:K=V``); one value per key."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    value: Mapped[str] = mapped_column(String(TAG_VALUE_LENGTH), index=True)
    device: Mapped[Device] = relationship(back_populates="tags")


class AuditEntry(Base):
    """Who did what to which target, why, and when (``edgefleet audit``)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Double, index=True)
    actor: Mapped[str] = mapped_column(String(_TEXT_LENGTH))
    action: Mapped[str] = mapped_column(String(NAME_LENGTH))
    target: Mapped[str] = mapped_column(String(_TEXT_LENGTH))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


# -- opening and migrating ---------------------------------------------------------


@dataclass
class Database:
    """An open, migrated database: its engine and a session factory."""

    url: URL
    engine: Engine
    sessions: sessionmaker[Session]

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on leaving, rolled back on an error."""
        with self.sessions.begin() as session:
            yield session

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def database_url(url_or_path: str | Path) -> URL:
    """The SQLAlchemy URL of ``url_or_path``: a URL as given, a file path as SQLite."""
    text = str(url_or_path)
    if "://" not in text:
        if not text:
            raise DatabaseUrlError(
                "no database given", hint="pass a file path (SQLite) or a postgresql+psycopg:// URL"
            )
        return URL.create("sqlite+pysqlite", database=str(Path(text).expanduser().resolve()))
    try:
        url = make_url(text)
    except ArgumentError as exc:
        raise DatabaseUrlError(f"{text!r} is not a database URL ({exc})", hint=_URL_HINT) from exc
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseUrlError(
            f"database URL {url.render_as_string(hide_password=True)}: the controller "
            f"stores its registry in SQLite or PostgreSQL, not {url.get_backend_name()}",
            hint=_URL_HINT,
        )
    if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3, the [controller] extra
    return url


_URL_HINT = (
    "give a file path for SQLite (e.g. /var/lib/edgefleet/controller.sqlite3) or "
    "postgresql+psycopg://USER@HOST:5432/DBNAME"
)


def create_database_engine(url: URL, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> Engine:
    """An engine for ``url``; SQLite connections get WAL, foreign keys and a busy timeout
    (how long a write waits for another connection's lock before failing)."""
    try:
        engine = create_engine(url, pool_pre_ping=url.get_backend_name() == "postgresql")
    except (ArgumentError, NoSuchModuleError) as exc:
        raise DatabaseUrlError(f"cannot use {_shown(url)} ({exc})", hint=_URL_HINT) from exc
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", functools.partial(_sqlite_pragmas, busy_timeout_ms))
    return engine


def _sqlite_pragmas(busy_timeout_ms: int, connection: sqlite3.Connection, record: object) -> None:
    cursor = connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")  # durable with WAL, one fsync per checkpoint
    finally:
        cursor.close()


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def open_database(
    url_or_path: str | Path, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS
) -> Database:
    """The database at ``url_or_path``, migrated to this code's schema (:func:`migrate`)."""
    url = database_url(url_or_path)
    engine = create_database_engine(url, busy_timeout_ms=busy_timeout_ms)
    try:
        _migrate(engine, url)
    except BaseException:
        engine.dispose()
        raise
    return Database(url, engine, sessionmaker(engine, expire_on_commit=False))


def migrate(url_or_path: str | Path) -> list[str]:
    """Upgrade the database to this code's head revisions; returns them.

    Refuses (:class:`DatabaseTooNew`) a database at a revision this code does not know.
    """
    url = database_url(url_or_path)
    engine = create_database_engine(url)
    try:
        return _migrate(engine, url)
    finally:
        engine.dispose()


def head_revisions() -> list[str]:
    """The newest schema revisions this code knows."""
    return sorted(_scripts().get_heads())


def current_revisions(url_or_path: str | Path) -> list[str]:
    """The revisions the database is at (empty for a database never migrated)."""
    url = database_url(url_or_path)
    engine = create_database_engine(url)
    try:
        with _connected(engine, url) as connection:
            return sorted(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()


def _scripts() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(MIGRATIONS / "versions"))
    return ScriptDirectory.from_config(config)


@contextmanager
def _connected(engine: Engine, url: URL) -> Iterator[Connection]:
    try:
        connection = engine.connect()
    except OperationalError as exc:
        raise DatabaseError(
            f"cannot open the database {_shown(url)} ({_first_line(exc)})",
            hint="check the path (its folder must exist and be writable) or that the "
            "PostgreSQL server runs and the database exists",
        ) from exc
    with connection:
        yield connection


def _first_line(exc: SQLAlchemyError) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _migrate(engine: Engine, url: URL) -> list[str]:
    scripts = _scripts()
    heads = sorted(scripts.get_heads())
    with _connected(engine, url) as connection:
        try:
            with connection.begin():  # one transaction: read, check, upgrade
                current = MigrationContext.configure(connection).get_current_heads()
                _refuse_unknown(scripts, current, url)
                _run_upgrade(connection, scripts)
        except OperationalError as exc:
            raise DatabaseError(
                f"cannot migrate the database {_shown(url)} ({_first_line(exc)})",
                hint="check that this user may create tables there",
            ) from exc
    if list(current) != heads:
        log.info(
            "database migrated url=%s from=%s to=%s",
            _shown(url),
            ",".join(current) or "empty",
            ",".join(heads),
        )
    return heads


def _refuse_unknown(scripts: ScriptDirectory, current: tuple[str, ...], url: URL) -> None:
    for revision in current:
        try:
            known = scripts.get_revision(revision)
        except CommandError:
            known = None
        if known is None:
            raise DatabaseTooNew(
                f"the database {_shown(url)} is at schema revision {revision}, which this "
                f"edgefleet does not know (it knows up to {', '.join(scripts.get_heads())}): a "
                "newer edgefleet migrated it; nothing was changed",
                hint="run the controller of the edgefleet version that migrated it (or newer), "
                "or point this one at another database",
            )


def _run_upgrade(connection: Connection, scripts: ScriptDirectory) -> None:
    """What an Alembic ``env.py`` does online, without one: upgrade to every head."""

    def upgrade(rev: Any, context: MigrationContext) -> list[RevisionStep]:
        return scripts._upgrade_revs("heads", rev)  # what `alembic upgrade heads` calls

    environment = EnvironmentContext(Config(), scripts)
    environment.configure(
        connection=connection,
        target_metadata=Base.metadata,
        fn=upgrade,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE by copy on SQLite
    )
    with environment:
        environment.run_migrations()


# Tables other modules declare on Base, imported so Base.metadata is the whole schema
# (what the migrations are checked against); at the end: they import this module.
from . import rollout_tables  # noqa: E402, F401
