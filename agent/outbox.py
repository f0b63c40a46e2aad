"""The durable event outbox: a bounded on-disk queue between inference and MQTT.

Events go in with :meth:`Outbox.put` and leave only when the broker has
acknowledged them (QoS 1 PUBACK) and the publisher calls :meth:`Outbox.ack`.
A broker outage therefore loses nothing up to ``max_events``; past it the
oldest events are dropped and counted (``dropped``, persisted). Rows carry a
global sequence number (SQLite ``AUTOINCREMENT``: strictly increasing, never
reused, also across restarts); reading oldest first keeps the order of every
stream.

Threads:

- the agent's start-up/shut-down code constructs the outbox and calls
  :meth:`Outbox.close` (or uses it as a context manager);
- the inference threads call :meth:`Outbox.put`, several at once;
- the MQTT publisher thread calls :meth:`Outbox.peek` and :meth:`Outbox.ack`;
- any thread (health, status) may read ``depth`` and ``dropped``.

Concurrency: one SQLite connection guarded by one :class:`threading.Lock`.
SQLite lets one writer at a time into a database anyway, and every call here
writes or reads one short transaction (tens of microseconds in ``normal``
sync mode, no fsync), so a lock costs nothing measurable while per-thread
connections would only add ``SQLITE_BUSY`` retries and make the in-memory
``depth`` counter racy. The connection runs in WAL mode with
``locking_mode=EXCLUSIVE``: this process owns the file while it is open, so
the counters cannot drift from the table, and a second agent pointed at the
same file gets a clear error instead of publishing the same events twice.

Durability: ``put`` commits before it returns. With ``sync="normal"`` a
commit is a write to the WAL (no fsync), which survives the process being
killed; ``sync="full"`` fsyncs the WAL on every commit, which also survives a
power cut at the price of one fsync per event.

Errors::

    EnvironmentProblem (edgefleet.runtime)
    └── OutboxError        the storage is unusable: unwritable location, disk
                           full, I/O error, file held by another process

A full disk is not fatal: a ``put`` that cannot be stored raises
``OutboxError`` (the caller counts the events as lost), ``not_stored`` counts
them, ``problem`` names the cause, and the first write that works again logs a
recovery line with the count. Reads go on while the disk is full.

A corrupt database file is not an error: it is moved aside as
``<name>.corrupt-<timestamp>`` (with its ``-wal``), a fresh outbox starts, and
every row still readable in the damaged file is copied into it, range by
range, halving a range that fails down to single rows (``salvaged``); the rows
that could not be read are counted (``lost``, the recorded depth minus what was
read) and logged at ERROR. This happens at start-up or whenever SQLite reports
the damage later.

Silent loss: a power cut can cut the WAL's tail, which SQLite then ignores
without any error. The outbox therefore records its depth and last seq in
``<name>.state`` (JSON, replaced atomically at most once a second and on
close); an outbox that opens with a lower last seq than recorded (committed
events are gone) logs a WARNING naming both depths and counts the difference
as ``lost``. A lower depth with the last seq intact is events acknowledged in
the last second before a crash, logged at INFO.

Misuse (a negative ``limit``, a closed outbox) raises the ordinary Python
exception.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.runtime import EnvironmentProblem

from .durable import looks_full

log = logging.getLogger(__name__)

T = TypeVar("T")

# Only another process holding the file can make SQLite wait; fail with a clear error instead.
_BUSY_TIMEOUT_S = 0.5
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0);
"""
# The depth record (``<name>.state``) is rewritten at most this often while events move.
_RECORD_EVERY_S = 1.0
# Rows copied per query when salvaging a damaged file; a failing range is halved.
_SALVAGE_CHUNK = 512
# SQLite's names for "this file is not (or no longer) a sound database".
_CORRUPTION = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_CORRUPTION_TEXT = ("file is not a database", "database disk image is malformed")


class OutboxSettings(BaseModel):
    """Where the outbox lives and how much it may hold."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(
        Path("/var/lib/edgefleet/outbox.sqlite3"),
        description="The SQLite database file holding events not yet acknowledged by the "
        "broker; its directory is created if missing and must be writable.",
    )
    max_events: int = Field(
        100_000,
        ge=1,
        description="Events kept while the broker is unreachable; past this the oldest are "
        "dropped and counted.",
    )
    sync: Literal["normal", "full"] = Field(
        "normal",
        description="SQLite synchronous mode: 'normal' keeps stored events if the process is "
        "killed, 'full' also across a power cut (one fsync per event).",
    )


@dataclass(frozen=True)
class OutboxItem:
    """One stored event, as handed to the publisher."""

    seq: int
    stream: str
    topic: str
    payload: bytes
    created_ts: float


class OutboxError(EnvironmentProblem):
    """The outbox storage is unusable (unwritable location, disk full, I/O error, in use)."""


class Outbox:
    """A bounded, durable FIFO of events waiting for the broker's acknowledgement."""

    def __init__(self, settings: OutboxSettings) -> None:
        """Open (or create) the outbox at ``settings.path``; rows from before a restart remain."""
        self._settings = settings
        self._path = settings.path
        self._lock = threading.Lock()
        self._depth = 0
        self._dropped = 0
        self._last_seq = 0
        self._full = False
        self._not_stored = 0
        self._not_stored_before = 0
        self._salvaged = 0
        self._lost = 0
        self._problem: str | None = None
        self._recorded_at = 0.0
        self._state_path = self._path.with_name(f"{self._path.name}.state")
        _make_directory(self._path)
        self._conn = self._open_or_recover()
        self._check_against_record()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def depth(self) -> int:
        """Events waiting for acknowledgement (a counter, not a table scan)."""
        return self._depth

    @property
    def dropped(self) -> int:
        """Events dropped by the bound, in total, across restarts."""
        return self._dropped

    @property
    def not_stored(self) -> int:
        """Events refused since start because the storage failed (disk full, I/O error)."""
        return self._not_stored

    @property
    def salvaged(self) -> int:
        """Events copied out of a damaged outbox file into the fresh one since start."""
        return self._salvaged

    @property
    def lost(self) -> int:
        """Stored events lost to damage since start (unreadable rows, a cut WAL)."""
        return self._lost

    @property
    def problem(self) -> str | None:
        """Why the outbox cannot write now (disk full, I/O error), or None."""
        return self._problem

    def put(self, stream: str, topic: str, payload: bytes) -> int:
        """Store one event durably, dropping the oldest past the bound; returns its seq."""
        return self.put_many(stream, topic, [payload])

    def put_many(self, stream: str, topic: str, payloads: Sequence[bytes]) -> int:
        """Store events of one stream in one transaction (one commit per frame, not per
        event), in order, dropping the oldest past the bound; returns the last seq."""
        if not payloads:
            return self._last_seq
        created_ts = time.time()
        rows = [(stream, topic, payload, created_ts) for payload in payloads]

        def insert(conn: sqlite3.Connection) -> tuple[int, int]:
            with _transaction(conn):
                seq = 0
                for row in rows:  # executemany gives no lastrowid
                    cursor = conn.execute(
                        "INSERT INTO events (stream, topic, payload, created_ts) "
                        "VALUES (?, ?, ?, ?)",
                        row,
                    )
                    seq = cursor.lastrowid or seq
                excess = self._depth + len(rows) - self._settings.max_events
                dropped = _drop_oldest(conn, excess) if excess > 0 else 0
            return seq, dropped

        with self._lock:
            try:
                seq, dropped = self._run("store events", insert)
            except OutboxError:
                self._not_stored += len(rows)
                raise
            self._last_seq = seq
            self._depth += len(rows) - dropped
            if dropped:
                self._count_drops(dropped)
            self._record(force=False)
        return seq

    def peek(self, limit: int, after_seq: int = 0) -> list[OutboxItem]:
        """Up to ``limit`` events with ``seq > after_seq``, oldest first; nothing is removed.

        Paging with ``after_seq`` never skips an event: seqs are assigned and committed
        under the same lock, so they become visible in increasing order.
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")

        def select(conn: sqlite3.Connection) -> list[OutboxItem]:
            rows = conn.execute(
                "SELECT seq, stream, topic, payload, created_ts FROM events "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
            return [OutboxItem(*row) for row in rows]

        with self._lock:
            return self._run("read events", select, write=False)

    def ack(self, seqs: Iterable[int]) -> None:
        """Remove acknowledged events in one transaction; unknown or repeated seqs are ignored."""
        params = [(seq,) for seq in set(seqs)]
        if not params:
            return

        def delete(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                return conn.executemany("DELETE FROM events WHERE seq = ?", params).rowcount

        with self._lock:
            removed = self._run("remove acknowledged events", delete)
            self._depth -= removed
            if self._full and self._depth < self._settings.max_events:
                self._full = False
                log.info(
                    "outbox %s below its bound again (%d waiting, %d dropped in total)",
                    self._path,
                    self._depth,
                    self._dropped,
                )
            self._record(force=False)

    def close(self) -> None:
        """Close the database (checkpointing the WAL into it); closing twice is harmless."""
        with self._lock:
            self._conn.close()
            self._record(force=True)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- opening and recovery ------------------------------------------------------------

    def _open_or_recover(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.OperationalError as exc:
            raise self._error("open", exc) from exc
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            damaged = self._move_aside(exc)
        try:
            conn = self._open()
        except sqlite3.OperationalError as exc:
            raise self._error("create a fresh outbox", exc) from exc
        self._salvage(damaged, conn, expected=self._expected_depth())
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            self._configure(conn)
            with _transaction(conn):
                _create_schema(conn)
                if self._last_seq:  # a fresh file replacing a corrupt one while running
                    self._carry_over(conn)
            self._load_counters(conn)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._settings.sync.upper()}")
        # Cheap next to the COUNT(*) that follows; a damaged file is found now, not mid-publish.
        check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")

    def _carry_over(self, conn: sqlite3.Connection) -> None:
        """Keep seqs increasing and the drop count across a corrupt file's replacement."""
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'events'")
        conn.execute(
            "INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (self._last_seq,)
        )
        conn.execute("UPDATE counters SET value = ? WHERE name = 'dropped'", (self._dropped,))

    def _load_counters(self, conn: sqlite3.Connection) -> None:
        self._depth = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        self._dropped = conn.execute(
            "SELECT value FROM counters WHERE name = 'dropped'"
        ).fetchone()[0]
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        self._last_seq = row[0] if row else 0
        excess = self._depth - self._settings.max_events
        if excess > 0:  # the bound was lowered since the last run
            with _transaction(conn):
                _drop_oldest(conn, excess)
            self._depth -= excess
            self._count_drops(excess)
        log.info(
            "outbox %s opened: %d events waiting, %d dropped in total",
            self._path,
            self._depth,
            self._dropped,
        )

    def _run(self, action: str, op: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Run ``op`` (lock held), noting a storage problem and its end (a write that works)."""
        try:
            result = self._run_recovering(action, op)
        except OutboxError as exc:
            if self._problem is None:  # once per outage, not once per failed write
                log.error("%s", exc)
                self._not_stored_before = self._not_stored
            self._problem = exc.message
            raise
        if write and self._problem is not None:
            log.warning(
                "outbox %s writable again: %d events could not be stored meanwhile "
                "(%d since start)",
                self._path,
                self._not_stored - self._not_stored_before,
                self._not_stored,
            )
            self._problem = None
        return result

    def _run_recovering(self, action: str, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op`` on the connection (lock held); on corruption start afresh and retry once."""
        try:
            return op(self._conn)
        except sqlite3.OperationalError as exc:
            raise self._error(action, exc) from exc
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            self._conn.close()
            damaged = self._move_aside(exc)
            expected, self._depth = self._depth, 0
            try:
                self._conn = self._open()
            except sqlite3.OperationalError as open_exc:
                raise self._error("create a fresh outbox", open_exc) from open_exc
            self._salvage(damaged, self._conn, expected=expected)
        try:
            return op(self._conn)
        except sqlite3.OperationalError as exc:
            raise self._error(action, exc) from exc

    def _move_aside(self, exc: sqlite3.DatabaseError) -> Path:
        """Rename the damaged file (and its -wal, -shm) aside; returns the new name."""
        target = _corrupt_name(self._path)
        try:
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self._path}{suffix}")
                if source.exists():
                    source.rename(f"{target}{suffix}")
        except OSError as os_exc:
            raise OutboxError(
                f"outbox {self._path} is corrupt ({exc}) and cannot be moved aside ({os_exc})",
                hint=_location_hint(self._path),
            ) from os_exc
        log.error(
            "outbox %s is corrupt (%s): moved it to %s, started a fresh outbox and "
            "copying every readable event into it",
            self._path,
            exc,
            target,
        )
        return target

    def _salvage(self, damaged: Path, conn: sqlite3.Connection, *, expected: int | None) -> None:
        """Copy every readable row of ``damaged`` into ``conn`` in seq order; count the rest.

        ``expected`` is how many events the damaged file held (the in-memory depth, or the
        depth record at start-up), None if unknown.
        """
        top = 0
        rows: list[tuple[int, str, str, bytes, float]] = []
        dropped_before = 0
        had_wal = Path(f"{damaged}-wal").exists()
        try:
            source = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            log.error("outbox %s: the damaged file cannot be opened at all (%s)", damaged, exc)
            source = None
        if source is not None:
            try:
                top = _highest_seq(source, max(self._last_seq, self._recorded_last_seq()))
                rows = _read_ranges(source, 1, top)
                dropped_before = _read_dropped(source)
            finally:
                source.close()
                # Reading made an index of its WAL (and an empty WAL if it had none).
                Path(f"{damaged}-shm").unlink(missing_ok=True)
                if not had_wal:
                    Path(f"{damaged}-wal").unlink(missing_ok=True)
        rows.sort()
        if rows or top:
            with _transaction(conn):
                conn.executemany(
                    "INSERT OR IGNORE INTO events (seq, stream, topic, payload, created_ts) "
                    "VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                if dropped_before > self._dropped:
                    conn.execute(
                        "UPDATE counters SET value = ? WHERE name = 'dropped'", (dropped_before,)
                    )
                # A seq is never reused, also one whose row could not be read.
                conn.execute(
                    "UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'events'", (top,)
                )
        self._load_counters(conn)
        lost = max(expected - len(rows), 0) if expected is not None else 0
        self._salvaged += len(rows)
        self._lost += lost
        log.error(
            "outbox %s salvaged from %s: %d events copied, %s lost",
            self._path,
            damaged,
            len(rows),
            str(lost) if expected is not None else "an unknown number (no depth record)",
        )

    # -- the depth record ----------------------------------------------------------------

    def _read_record(self) -> dict[str, float] | None:
        try:
            data = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("outbox depth record %s unreadable (%s); ignored", self._state_path, exc)
            return None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), (int, float)) for k in ("depth", "last_seq", "ts")
        ):
            log.warning("outbox depth record %s malformed; ignored", self._state_path)
            return None
        return data

    def _expected_depth(self) -> int | None:
        record = self._read_record()
        return int(record["depth"]) if record is not None else None

    def _recorded_last_seq(self) -> int:
        record = self._read_record()
        return int(record["last_seq"]) if record is not None else 0

    def _check_against_record(self) -> None:
        """Warn (and count) when the outbox opened with fewer events than last recorded."""
        record = self._read_record()
        if record is None or self._salvaged or self._lost:
            self._record(force=True)
            return
        depth, last_seq = int(record["depth"]), int(record["last_seq"])
        missing = depth - self._depth
        # Rows acknowledged after the record was written lower the depth legitimately; a
        # last seq lower than recorded cannot happen unless committed events were lost.
        if last_seq > self._last_seq:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record["ts"]))
            self._lost += max(missing, 0)
            log.warning(
                "outbox %s opened with %d events (last seq %d), but %d (last seq %d) were "
                "recorded at %s: %d events lost to a damaged WAL or file (fewer if some were "
                "acknowledged in the second before the agent stopped)",
                self._path,
                self._depth,
                self._last_seq,
                depth,
                last_seq,
                when,
                max(missing, 0),
            )
        elif missing > 0:
            log.info(
                "outbox %s opened with %d events, %d fewer than recorded: acknowledged just "
                "before the agent stopped",
                self._path,
                self._depth,
                missing,
            )
        self._record(force=True)

    def _record(self, *, force: bool) -> None:
        """Rewrite the depth record (lock held), at most once a second unless ``force``."""
        now = time.monotonic()
        if not force and now - self._recorded_at < _RECORD_EVERY_S:
            return
        self._recorded_at = now
        content = json.dumps(
            {"depth": self._depth, "last_seq": self._last_seq, "ts": time.time()}
        ).encode()
        temporary = self._state_path.with_name(f"{self._state_path.name}.tmp")
        try:
            temporary.write_bytes(content)
            temporary.replace(self._state_path)
        except OSError:  # disk full: the record is advisory, the previous one stays
            temporary.unlink(missing_ok=True)

    # -- bookkeeping ---------------------------------------------------------------------

    def _count_drops(self, count: int) -> None:
        """Record ``count`` drops already committed to the table (lock held or opening)."""
        self._dropped += count
        if not self._full:
            self._full = True
            log.warning(
                "outbox %s full at %d events: dropping the oldest until the broker "
                "acknowledges again (%d dropped in total)",
                self._path,
                self._settings.max_events,
                self._dropped,
            )

    def _error(self, action: str, exc: sqlite3.OperationalError) -> OutboxError:
        """Translate a failure of the storage into what an operator can act on."""
        name = getattr(exc, "sqlite_errorname", "")
        directory = self._path.parent
        if name == "SQLITE_FULL" or (name.startswith("SQLITE_IOERR") and looks_full(directory)):
            return OutboxError(
                f"outbox {self._path}: cannot {action}, the disk is full",
                hint=f"free space on the filesystem holding {directory}, or lower "
                "outbox.max_events",
            )
        if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
            return OutboxError(
                f"outbox {self._path}: cannot {action}, another process holds the file",
                hint="stop the other edgefleet-agent using it, or give each agent its own "
                "outbox.path",
            )
        if name.startswith("SQLITE_IOERR"):
            return OutboxError(
                f"outbox {self._path}: cannot {action}, I/O error ({exc})",
                hint=f"check the storage device holding {directory} (kernel log, free space)",
            )
        if self._path.is_dir():
            return OutboxError(
                f"outbox {self._path} is a directory", hint="set outbox.path to a file name"
            )
        return OutboxError(
            f"outbox {self._path}: cannot {action} ({exc})", hint=_location_hint(self._path)
        )


def _create_schema(conn: sqlite3.Connection) -> None:
    # executescript() would commit the open transaction; run the statements one by one.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed on success, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    conn.execute("COMMIT")


def _drop_oldest(conn: sqlite3.Connection, count: int) -> int:
    """Delete the ``count`` oldest rows and add them to the persisted counter (in a transaction)."""
    removed = conn.execute(
        "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
        (count,),
    ).rowcount
    conn.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (removed,))
    return removed


def _highest_seq(source: sqlite3.Connection, known: int) -> int:
    """The highest seq to look for in a damaged file: what it says, or what we knew."""
    for query in (
        "SELECT MAX(seq) FROM events",
        "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
    ):
        try:
            row = source.execute(query).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row and row[0]:
            return max(int(row[0]), known)
    return known


def _read_ranges(
    source: sqlite3.Connection, low: int, high: int
) -> list[tuple[int, str, str, bytes, float]]:
    """Every readable row with ``low <= seq <= high``; a range that fails is halved."""
    rows: list[tuple[int, str, str, bytes, float]] = []
    pending = [
        (start, min(start + _SALVAGE_CHUNK - 1, high))
        for start in range(low, high + 1, _SALVAGE_CHUNK)
    ]
    pending.reverse()
    while pending:
        start, end = pending.pop()
        try:
            rows.extend(
                source.execute(
                    "SELECT seq, stream, topic, payload, created_ts FROM events "
                    "WHERE seq BETWEEN ? AND ? ORDER BY seq",
                    (start, end),
                ).fetchall()
            )
        except sqlite3.DatabaseError:
            if start < end:
                middle = (start + end) // 2
                pending.append((middle + 1, end))
                pending.append((start, middle))
    return rows


def _read_dropped(source: sqlite3.Connection) -> int:
    try:
        row = source.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
    except sqlite3.DatabaseError:
        return 0
    return int(row[0]) if row else 0


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "")  # Python 3.11+; the message before that
    return name in _CORRUPTION or any(text in str(exc) for text in _CORRUPTION_TEXT)


def _corrupt_name(path: Path) -> Path:
    """``<name>.corrupt-<UTC timestamp>``, with a counter if that name is taken."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{counter}")
        counter += 1
    return target


def _make_directory(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutboxError(
            f"cannot create the outbox directory {path.parent} ({exc.strerror or exc})",
            hint=_location_hint(path),
        ) from exc


def _location_hint(path: Path) -> str:
    """Say what stands between this process and writing ``path``."""
    user = _user()
    directory = path.parent
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory: set outbox.path under a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"{user} needs write and search (w, x) permission on the directory {existing} "
            "(for the database and its -wal file): grant it, e.g. with chown, or set "
            "outbox.path to a writable place"
        )
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"{user} needs read and write permission on {path}: grant it, e.g. with chown"
    return f"check the permissions and free space of {directory}"


def _user() -> str:
    uid = os.geteuid()
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"
