"""Commands over MQTT: parsed at the edge, run at most once, always answered.

A request arrives on ``cmd/<name>``. MQTT 5 senders set the response topic and
correlation data; MQTT 3.1.1 senders put ``reply_to`` in the payload. Every
request that names a place to answer gets a ``CommandReply`` with ``ok``, an
``ErrorCode`` and a message; one that does not is logged and counted.

``parse_command`` decides, without I/O, what a payload is: a typed
``ParsedCommand`` or a ``Refused`` with the error reply it deserves (too large,
not JSON, not a request, unknown command, bad arguments) and, when the request
could be read, its ``reply_to``. ``CommandJournal`` remembers every
id it ran, in SQLite beside the model store, so a redelivered request (QoS 1
after a reconnect, a controller retry) is answered from the recorded reply and
never run twice, even across a restart. An expired request is refused.

Time: expiry is judged at the trusted time (the clock, never before the newest
trusted time seen, as for manifests), and a refusal says when the kernel's
clock is not synchronised. The journal forgets ids by count (the newest
``keep_count`` stay) and by age measured in the agent's own running time
(monotonic, added up across restarts in the journal), never by the wall clock
and never while the clock is unsynchronised: a clock stepped days ahead, or a
restart, cannot make it forget an id, so a redelivered request is never run
again. Running time never exceeds real time, so an id is kept at least
``keep_s``.

Threads: ``Commands.receive`` runs on the ``mqtt`` thread and only queues; the
``commands`` thread (``Commands._run``) checks the journal, runs the handler
and sends the reply. Handlers therefore run one at a time, off the network
thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from edgefleet.runtime import EdgefleetError

from .acceptance import Clock, trusted_now
from .clock import kernel_synchronised
from .config import CommandSettings
from .durable import looks_full
from .mqtt import Inbound
from .protocol import (
    COMMAND_ARGS,
    COMMAND_ID_PATTERN,
    SCHEMA_VERSION,
    TOPIC_NAME_PATTERN,
    CommandName,
    CommandReply,
    CommandRequest,
    ErrorCode,
    describe_errors,
)
from .supervisor import SUPERVISOR, fault_point

log = logging.getLogger(__name__)

_QUEUE_SIZE = 1024
_WAIT_S = 0.5
_PRUNE_EVERY_S = 3600.0  # a long-running agent forgets old ids this often (monotonic)
_T = TypeVar("_T")
_LOG_EVERY = 100  # a flood of junk logs one line per this many rejects


class CommandFailed(EdgefleetError):
    """A handler could not do what was asked; ``code`` says which way it went wrong."""

    def __init__(self, code: ErrorCode, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.code = code


@dataclass(frozen=True)
class ParsedCommand:
    """A request that passed every check at the edge."""

    name: CommandName
    request: CommandRequest
    args: BaseModel


@dataclass(frozen=True)
class Refused:
    """A payload that is not a runnable command, and the error reply it gets.

    ``reply_to`` is the request's MQTT 3.1.1 reply topic, when it could be read that far
    (an unknown command or bad arguments), so such clients hear why too.
    """

    reply: CommandReply
    reply_to: str | None = None


Handler = Callable[[Any], dict[str, Any]]


def error_reply(
    command: str, code: ErrorCode, message: str, *, id_: str | None = None
) -> CommandReply:
    """A reply saying why a command was not carried out."""
    return CommandReply(
        id=id_, command=command, ok=False, error=code, message=message, ts=time.time()
    )


class _Rejected(Exception):
    """A payload that is not a runnable command; carries how it is refused."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.reply.message)
        self.refused = refused


def parse_command(name: str, payload: bytes, *, max_bytes: int) -> ParsedCommand | Refused:
    """The typed command in ``payload``, or the error reply it gets. Pure."""
    try:
        request = _request(name, payload, max_bytes)
        return ParsedCommand(*_arguments(name, request))
    except _Rejected as rejected:
        return rejected.refused


def _clock_note(clock: Clock) -> str:
    """What an expiry refusal says about the clock it was judged by, if it may be wrong."""
    notes = []
    if clock.floor > clock.now:
        notes.append(
            f"judged at the newest trusted time, {clock.floor - clock.now:.0f} s ahead of the "
            "device's clock"
        )
    if kernel_synchronised() is False:
        notes.append("the device's clock is not synchronised (NTP); check its time")
    return f" ({'; '.join(notes)})" if notes else ""


def _is_topic_name(topic: str) -> bool:
    """Whether one can publish to ``topic``: not empty, no wildcards, no NUL."""
    return re.fullmatch(TOPIC_NAME_PATTERN, topic) is not None


def _request(name: str, payload: bytes, max_bytes: int) -> CommandRequest:
    def reject(code: ErrorCode, message: str, id_: str | None = None) -> _Rejected:
        return _Rejected(Refused(error_reply(name, code, message, id_=id_)))

    if len(payload) > max_bytes:
        raise reject(ErrorCode.TOO_LARGE, f"payload of {len(payload)} bytes exceeds {max_bytes}")
    try:
        data = json.loads(payload)
    # ValueError: also not UTF-8, and numbers longer than int() takes (4300 digits).
    except (ValueError, RecursionError) as exc:
        raise reject(ErrorCode.MALFORMED, f"payload is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise reject(ErrorCode.MALFORMED, "payload must be a JSON object")
    # Echoed only when it is a valid id: a lone surrogate could not even be sent back.
    raw_id = data.get("id")
    id_ = raw_id if isinstance(raw_id, str) and re.fullmatch(COMMAND_ID_PATTERN, raw_id) else None
    try:
        request = CommandRequest.model_validate(data)
    except ValidationError as exc:
        raise reject(
            ErrorCode.MALFORMED, f"not a command request: {describe_errors(exc)}", id_
        ) from None
    if request.schema_version != SCHEMA_VERSION:
        raise reject(
            ErrorCode.MALFORMED,
            f"schema_version {request.schema_version} is not supported (this agent speaks "
            f"{SCHEMA_VERSION})",
            id_,
        )
    return request


def _arguments(name: str, request: CommandRequest) -> tuple[CommandName, CommandRequest, BaseModel]:
    try:
        command = CommandName(name)
    except ValueError:
        known = ", ".join(c.value for c in CommandName)
        reply = error_reply(
            name,
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {name!r}; known: {known}",
            id_=request.id,
        )
        raise _Rejected(Refused(reply, request.reply_to)) from None
    try:
        args = COMMAND_ARGS[command].model_validate(request.args)
    except ValidationError as exc:
        reply = error_reply(name, ErrorCode.INVALID_ARGS, describe_errors(exc), id_=request.id)
        raise _Rejected(Refused(reply, request.reply_to)) from None
    return command, request, args


class JournalUnavailable(EdgefleetError):
    """The command journal cannot be read or written (disk full, I/O error)."""


class CommandJournal:
    """Ids of the commands run, with their replies: at most once, across restarts.

    One SQLite connection, used by the ``commands`` thread only. A journal that
    cannot be opened or written (disk full, I/O error) does not stop the agent:
    each use raises :class:`JournalUnavailable`, the command is answered
    ``failed`` without running (it could not be recorded, so running it could
    break at-most-once), and the journal is opened again on a later use, so
    commands work again as soon as there is space, without a restart.
    """

    def __init__(
        self,
        path: Path,
        *,
        keep_s: float,
        keep_count: int = 100_000,
        synchronised: Callable[[], bool | None] = kernel_synchronised,
    ) -> None:
        self._path = path
        self._keep_s = keep_s
        self._keep_count = keep_count
        self._synchronised = synchronised
        self._runtime_base = 0.0  # the agent's running time when the journal was opened
        self._opened_at = time.monotonic()
        self._db: sqlite3.Connection | None = None
        self._problem: str | None = None
        try:
            self._db = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._unavailable("open", exc)

    @property
    def problem(self) -> str | None:
        """Why the journal is unavailable now, or None."""
        return self._problem

    def _open(self) -> sqlite3.Connection:
        path = self._path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, command TEXT NOT NULL, "
                "reply TEXT, created REAL NOT NULL)"
            )
            self._load_runtime(db)
            self._prune(db)
        except BaseException:
            db.close()
            raise
        return db

    def _unavailable(self, action: str, exc: sqlite3.Error | OSError) -> JournalUnavailable:
        """Log (once per distinct problem) and return the error a command is answered with."""
        name = getattr(exc, "sqlite_errorname", "")
        full = (
            name == "SQLITE_FULL"
            or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
            or (name.startswith("SQLITE_IOERR") and looks_full(self._path.parent))
        )
        reason = "disk full" if full else str(exc)
        message = f"journal unavailable ({reason})"
        if self._problem != message:
            log.error(
                "command journal %s: cannot %s (%s); commands are answered 'failed' "
                "until it works again",
                self._path,
                action,
                reason,
            )
        self._problem = message
        hint = (
            f"free space on the filesystem holding {self._path.parent}"
            if full
            else f"check {self._path} and its directory (permissions, storage device)"
        )
        return JournalUnavailable(message, hint=hint)

    def _use(self, action: str, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``op`` on the journal, reopening it if it was unavailable."""
        if self._db is None:  # commands are rare: try again at each one
            try:
                self._db = self._open()
            except (sqlite3.Error, OSError) as exc:
                raise self._unavailable("open", exc) from exc
        try:
            result = op(self._db)
        except sqlite3.Error as exc:
            raise self._unavailable(action, exc) from exc
        if self._problem is not None:
            log.warning("command journal %s works again: commands run again", self._path)
            self._problem = None
        return result

    def _load_runtime(self, db: sqlite3.Connection) -> None:
        """Add the running-time column and record (older journals), then read it."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(commands)")}
        if "runtime" not in columns:  # ids from before: age 0, forgotten keep_s from now
            db.execute("ALTER TABLE commands ADD COLUMN runtime REAL NOT NULL DEFAULT 0")
        db.execute("CREATE TABLE IF NOT EXISTS clock (key TEXT PRIMARY KEY, value REAL NOT NULL)")
        saved = db.execute(
            "SELECT max(v) FROM (SELECT value AS v FROM clock WHERE key = 'runtime_s' "
            "UNION ALL SELECT max(runtime) FROM commands)"
        ).fetchone()[0]
        self._runtime_base = float(saved or 0.0)
        self._opened_at = time.monotonic()

    def runtime(self) -> float:
        """The agent's running time in seconds, over every run this journal has seen.

        Monotonic within a run, carried across restarts: never above the real time passed,
        whatever the wall clock says.
        """
        return self._runtime_base + (time.monotonic() - self._opened_at)

    def _prune(self, db: sqlite3.Connection) -> None:
        now = self.runtime()
        db.execute("INSERT OR REPLACE INTO clock (key, value) VALUES ('runtime_s', ?)", (now,))
        db.execute(
            "DELETE FROM commands WHERE rowid NOT IN "
            "(SELECT rowid FROM commands ORDER BY rowid DESC LIMIT ?)",
            (self._keep_count,),
        )
        if self._synchronised() is True:  # never while the clock may be wrong
            db.execute("DELETE FROM commands WHERE runtime < ?", (now - self._keep_s,))

    def prune(self) -> None:
        """Forget ids past ``keep_count`` and older than ``keep_s`` of running time."""
        self._use("prune", self._prune)

    def recorded(self, id: str) -> CommandReply | None:
        """The reply to ``id`` if it ran before; a run cut short by a restart says so."""
        row = self._use(
            "read",
            lambda db: db.execute(
                "SELECT command, reply FROM commands WHERE id = ?", (id,)
            ).fetchone(),
        )
        if row is None:
            return None
        command, reply = row
        if reply is None:
            return error_reply(
                command,
                ErrorCode.FAILED,
                "the agent restarted while running this command; it is not run again",
                id_=id,
            )
        return CommandReply.model_validate_json(reply)

    def begin(self, id: str, command: str) -> None:
        """Record that ``id`` is running, before it runs."""
        self._use(
            "record a command",
            lambda db: db.execute(
                "INSERT INTO commands (id, command, reply, created, runtime) "
                "VALUES (?, ?, NULL, ?, ?)",
                (id, command, time.time(), self.runtime()),
            ),
        )

    def finish(self, id: str, reply: CommandReply) -> None:
        """Record the reply of ``id``."""
        self._use(
            "record a reply",
            lambda db: db.execute(
                "UPDATE commands SET reply = ? WHERE id = ?", (reply.model_dump_json(), id)
            ),
        )

    def close(self) -> None:
        """Close the database."""
        if self._db is not None:
            # The running time so far, for the next run's ages; failing that, ages count
            # less time: ids are kept longer, never shorter.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute(
                    "INSERT OR REPLACE INTO clock (key, value) VALUES ('runtime_s', ?)",
                    (self.runtime(),),
                )
            self._db.close()


class Commands:
    """Receives command messages, runs them one at a time, answers each."""

    def __init__(
        self,
        handlers: Mapping[CommandName, Handler],
        *,
        journal: CommandJournal,
        command_name: Callable[[str], str | None],
        send: Callable[[str, bytes, bytes | None], None],
        settings: CommandSettings,
        clock: Callable[[], Clock] | None = None,
    ) -> None:
        self._handlers = handlers
        self._clock = clock or (lambda: Clock(now=time.time()))
        self._journal = journal
        self._command_name = command_name
        self._send = send
        self._settings = settings
        self._queue: queue.Queue[Inbound] = queue.Queue(_QUEUE_SIZE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.answered = 0
        self.unanswered = 0

    def start(self) -> None:
        """Start the ``commands`` thread."""
        self._stop.clear()
        self._thread = SUPERVISOR.start("commands", self._run, self._stop)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking commands; a running handler finishes first (bounded by ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def receive(self, message: Inbound) -> None:  # mqtt thread
        """Queue a command message; answer 'busy' at once when the queue is full."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            name = self._command_name(message.topic) or "?"
            self._answer(
                message,
                error_reply(name, ErrorCode.REFUSED, "busy: too many commands waiting"),
                None,
            )

    def _run(self) -> None:  # commands thread
        next_prune = time.monotonic() + _PRUNE_EVERY_S
        while not self._stop.is_set():
            fault_point()
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + _PRUNE_EVERY_S
                with contextlib.suppress(JournalUnavailable):  # logged; tried again later
                    self._journal.prune()
            try:
                message = self._queue.get(timeout=_WAIT_S)
            except queue.Empty:
                continue
            self._handle(message)

    def _handle(self, message: Inbound) -> None:
        name = self._command_name(message.topic) or "?"
        parsed = parse_command(name, message.payload, max_bytes=self._settings.max_payload_bytes)
        if isinstance(parsed, Refused):
            self._answer(message, parsed.reply, parsed.reply_to)
            return
        request = parsed.request
        try:
            self._run_once(message, name, parsed)
        except JournalUnavailable as exc:
            log.warning("command %s %s not run: %s", name, request.id, exc)
            reply = error_reply(name, ErrorCode.FAILED, str(exc), id_=request.id)
            self._answer(message, reply, request.reply_to)

    def _run_once(self, message: Inbound, name: str, parsed: ParsedCommand) -> None:
        """Answer from the journal, or record, run and answer (JournalUnavailable: not run)."""
        request = parsed.request
        recorded = self._journal.recorded(request.id)
        if recorded is not None:
            log.info("command %s %s: repeated id, answered from the record", name, request.id)
            self._answer(message, recorded, request.reply_to)
            return
        clock = self._clock()
        now = trusted_now(clock)
        if request.expires_at < now:
            reply = error_reply(
                name,
                ErrorCode.EXPIRED,
                f"expired {now - request.expires_at:.1f} s ago{_clock_note(clock)}; not run",
                id_=request.id,
            )
            self._answer(message, reply, request.reply_to)
            return
        self._journal.begin(request.id, name)
        reply = self._execute(parsed)
        try:
            self._journal.finish(request.id, reply)
        except JournalUnavailable as exc:  # it ran: answer what it did; a repeat is not re-run
            log.warning("command %s %s: reply not recorded: %s", name, request.id, exc)
        self._answer(message, reply, request.reply_to)

    def _execute(self, parsed: ParsedCommand) -> CommandReply:
        name, id_ = parsed.name.value, parsed.request.id
        try:
            result = self._handlers[parsed.name](parsed.args)
        except CommandFailed as exc:
            log.warning("command %s %s failed: %s", name, id_, exc)
            return error_reply(name, exc.code, str(exc), id_=id_)
        except EdgefleetError as exc:
            log.warning("command %s %s failed: %s", name, id_, exc)
            return error_reply(name, ErrorCode.FAILED, str(exc), id_=id_)
        except Exception as exc:  # a bug in one handler must not end the commands thread
            log.exception("command %s %s failed on a bug", name, id_)
            message = f"internal error ({type(exc).__name__}); the device log has the details"
            return error_reply(name, ErrorCode.FAILED, message, id_=id_)
        log.info("command %s %s done", name, id_)
        return CommandReply(
            id=id_, command=name, ok=True, message="done", result=result, ts=time.time()
        )

    def _answer(self, message: Inbound, reply: CommandReply, reply_to: str | None) -> None:
        topic = message.response_topic or reply_to
        # paho raises on a wildcard topic, and mosquitto passes such a response topic on.
        if topic is None or not _is_topic_name(topic):
            self.unanswered += 1
            if self.unanswered % _LOG_EVERY == 1:
                log.warning(
                    "command on %s not answered, no response topic one can publish to "
                    "(%d so far): %s",
                    message.topic,
                    self.unanswered,
                    reply.message,
                )
            return
        self.answered += 1
        self._send(topic, reply.model_dump_json().encode(), message.correlation_data)
